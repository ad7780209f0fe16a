"""Canaries: programs a model could write, each trying to escape the evaluation sandbox under bubblewrap.

Every canary runs through an evaluator in a subprocess of its own (`run_program` in a fresh interpreter),
so a canary that escapes and kills its evaluator fails the test instead of killing pytest. For each one:
nothing it tried is visible outside, the evaluator survives and reports a result, and every process it
started is gone when run_program returns."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from codefill.evaluation import sandbox
from codefill.evaluation.sandbox import check_sandbox, isolation
from helpers import all_gone, processes_with

pytestmark = pytest.mark.skipif(isolation() != "bubblewrap",
                                reason="bubblewrap (bwrap) is not installed or cannot run here: "
                                       "run scripts/setup.sh (apt-get install bubblewrap)")

EVALUATOR = """\
import json, sys
from codefill.evaluation.sandbox import SandboxLimits, isolation, run_program
limits = SandboxLimits(timeout_s=float(sys.argv[1]))
r = run_program(sys.stdin.read(), limits)
print(json.dumps({"isolation": isolation(), "status": r.status, "returncode": r.returncode,
                  "output": r.output_tail}))
"""


def evaluate(source: str, timeout_s: float = 5.0) -> dict:
    """Run `source` under an evaluator subprocess; the evaluator must survive and report."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", EVALUATOR, str(timeout_s)], input=source, capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, f"the evaluator died (returncode {done.returncode}): {done.stderr[-2000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["isolation"] == "bubblewrap"
    return result


def tagged(token: str, body: str) -> str:
    """A program that re-executes itself with `token` in its argv (so that it and every process it forks can
    be found from outside, whatever pid namespace they are in), then runs `body`."""
    return f"""\
import os, sys
if sys.argv[1:] != [{token!r}]:
    os.execv(sys.executable, [sys.executable, "-I", "-S", "-B", sys.argv[0], {token!r}])
{body}"""


@pytest.fixture
def token():
    return f"codefill-canary-{uuid.uuid4().hex}"


def test_writes_outside_its_directory_and_into_home_do_not_escape(tmp_path, token):
    outside = [Path(__file__).resolve().parent / f".{token}", Path.home() / f".{token}", tmp_path / token,
               Path("/var/tmp") / token]
    r = evaluate("import os\n" + "".join(f"""\
try:
    with open({str(p)!r}, "w") as f:
        f.write("escaped")
    print("WROTE", {str(p)!r})
except OSError as e:
    print("REFUSED", {str(p)!r}, e.strerror)
""" for p in outside))
    assert r["status"] == "passed", r
    for p in outside:
        assert not p.exists(), f"{p} was written from inside the sandbox: {r['output']}"
    assert "Read-only file system" in r["output"]


def test_the_home_directory_cannot_be_read(token):
    secret = Path.home() / f".{token}-secret"
    secret.write_text("the user's secret")
    try:
        r = evaluate(f"""\
import os
print("HOME LISTING", sorted(os.listdir({str(Path.home())!r})))
try:
    print("READ", open({str(secret)!r}).read())
except OSError as e:
    print("CANNOT READ", e.strerror)
""")
    finally:
        secret.unlink()
    assert r["status"] == "passed", r
    assert "the user's secret" not in r["output"] and "CANNOT READ No such file" in r["output"], r
    interpreter = Path(os.path.realpath(sys.base_prefix))  # bound back read-only when it lives in the home
    shown = [interpreter.relative_to(Path.home()).parts[0]] if interpreter.is_relative_to(Path.home()) else []
    assert f"HOME LISTING {shown}" in r["output"], r


def test_no_network():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        r = evaluate(f"""\
import socket
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=3).close()
    print("CONNECTED")
except OSError as e:
    print("REFUSED", e)
""")
    assert "REFUSED" in r["output"] and "CONNECTED" not in r["output"], r


@pytest.mark.parametrize("kill", ["os.kill(os.getppid(), signal.SIGKILL)", "os.killpg(os.getpgid(0), signal.SIGKILL)",
                                  "os.kill(-1, signal.SIGKILL)", "os.kill(1, signal.SIGKILL)"])
def test_killing_its_parent_or_group_or_everything_leaves_the_evaluator_alive(kill):
    r = evaluate(f"import os, signal\nprint('PARENT', os.getppid(), flush=True)\n{kill}\nprint('AFTER')\n")
    assert "PARENT 1" in r["output"], r  # its parent is bwrap's init in its own PID namespace


def test_a_setsid_child_does_not_outlive_the_program(token):
    r = evaluate(f"""\
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(100)", {token!r}],
                         start_new_session=True)
time.sleep(0.5)
print("CHILD RUNNING", child.poll() is None, flush=True)
""")
    assert r["status"] == "passed" and "CHILD RUNNING True" in r["output"], r
    assert all_gone(token), f"a setsid child survived: {processes_with(token)}"


def test_a_fork_bomb_is_stopped_and_leaves_nothing(token):
    """Children forked in a loop until the wall clock runs out (as root RLIMIT_NPROC does not apply, so the
    timeout is what stops it: a linear bomb keeps this test from starving the machine it runs on)."""
    r = evaluate(tagged(token, """\
import time
n = 0
while True:
    if os.fork() == 0:
        time.sleep(100)
        os._exit(0)
    n += 1
    if n % 100 == 0:
        print("FORKED", n, flush=True)
"""), timeout_s=1.0)
    assert r["status"] == "timeout", r
    assert "FORKED" in r["output"], r
    assert all_gone(token), f"{len(processes_with(token))} processes of the fork bomb survived"


def test_a_memory_bomb_fails_and_the_evaluator_survives():
    r = evaluate("chunks = []\nwhile True:\n    chunks.append(bytearray(64 * 1024 * 1024))\n")
    assert r["status"] == "failed" and "MemoryError" in r["output"], r


def test_disk_bombs_fill_only_the_bounded_scratch_directory_and_tmp():
    before = shutil.disk_usage("/tmp").free
    r = evaluate("""\
import os
for where in (".", "/tmp"):
    total = 0
    try:
        for i in range(10_000):
            with open(os.path.join(where, f"fill-{i}"), "wb") as f:
                f.write(b"x" * (4 << 20))
            total += 4 << 20
    except OSError as e:
        print("FULL", where, total >> 20, e.strerror)
""", timeout_s=20.0)
    assert r["status"] == "passed", r
    full = [line.split() for line in r["output"].splitlines() if line.startswith("FULL")]
    assert [f[1] for f in full] == [".", "/tmp"], r
    for f in full:
        assert int(f[2]) <= sandbox.SandboxLimits().tmp_bytes >> 20 and f[3:] == ["No", "space", "left", "on",
                                                                                    "device"], r
    assert shutil.disk_usage("/tmp").free > before - (32 << 20)  # the host's disk did not take the writes


def test_the_known_good_check_reports_the_isolation_in_force(monkeypatch):
    warnings = []
    assert check_sandbox(warn=warnings.append) == "bubblewrap" and warnings == []
    monkeypatch.setattr(sandbox, "_bwrap_path", lambda: None)
    name = check_sandbox(warn=warnings.append)
    assert name in ("unshare-net", "none")
    assert len(warnings) == 1 and "WARNING: " in warnings[0] and "bubblewrap" in warnings[0]
