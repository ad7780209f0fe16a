"""The sandbox on real subprocesses: pass/fail/timeout, the process group dies with the program, memory and file
limits hold, the working directory is fresh and removed, no network where isolation is on, and the known-good
check refuses a sandbox that cannot run anything."""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import replace

import pytest

from codefill.evaluation import sandbox
from codefill.evaluation.eval_error import EvalError
from codefill.evaluation.sandbox import SandboxLimits, check_sandbox, network_isolation, run_many, run_program
from helpers import all_gone

MIB = 1 << 20


def sleeper(token: str) -> str:
    """A command line (for the program to start) that sleeps 100 s and carries `token` in its argv."""
    return f"[sys.executable, '-c', 'import time; time.sleep(100)', '{token}']"


def test_passing_program_passes_isolated():
    r = run_program("""\
import os, sys
assert sys.flags.isolated == 1 and sys.flags.no_site == 1 and sys.flags.dont_write_bytecode == 1
assert set(os.environ) <= {"PATH", "HOME", "TMPDIR", "LANG", "LC_CTYPE", "PWD"}, sorted(os.environ)
assert os.environ["PATH"] == "/usr/bin:/bin"
assert os.environ["HOME"] == os.environ["TMPDIR"] == os.getcwd()
assert sys.stdin.read() == ""
print("hello from the sandbox")
""")
    assert r.status == "passed" and r.passed and r.returncode == 0, r
    assert "hello from the sandbox" in r.output_tail


def test_failing_assert_fails():
    r = run_program("def f():\n    return 2\n\nassert f() == 3, 'wrong answer'\n")
    assert r.status == "failed" and not r.passed and r.returncode == 1, r
    assert "AssertionError: wrong answer" in r.output_tail


def test_syntax_error_fails_and_output_tail_is_bounded():
    r = run_program("print('x' * 10000)\ndef broken(:\n")
    assert r.status == "failed"
    r = run_program("import sys\nsys.stdout.write('a' * 50000 + 'END')\nsys.exit(3)\n")
    assert r.status == "failed" and r.returncode == 3
    assert r.output_tail.endswith("END") and len(r.output_tail) == sandbox.OUTPUT_TAIL_CHARS


def test_infinite_loop_times_out_and_its_child_dies():
    limits = SandboxLimits(timeout_s=1.0)
    token = f"codefill-canary-{uuid.uuid4().hex}"
    start = time.monotonic()
    r = run_program(f"""\
import os, sys, time
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, {sleeper(token)})
print("CHILD", pid, flush=True)
while True:
    pass
""", limits)
    elapsed = time.monotonic() - start
    assert r.status == "timeout" and r.returncode == -9, r
    assert 0.9 <= elapsed < 3.0, elapsed
    assert "CHILD" in r.output_tail
    assert all_gone(token), "the program's forked child survived the timeout"


def test_a_grandchild_left_behind_by_a_normal_exit_is_killed():
    token = f"codefill-canary-{uuid.uuid4().hex}"
    r = run_program(f"""\
import subprocess, sys, time
child = subprocess.Popen({sleeper(token)})
time.sleep(0.3)
print("CHILD", child.pid, child.poll(), flush=True)
""")
    assert r.status == "passed" and "CHILD" in r.output_tail and "None" in r.output_tail, r  # it was running
    assert all_gone(token), "a subprocess the program left running survived it"


def test_memory_hog_fails_without_harm():
    limits = SandboxLimits(memory_bytes=256 * MIB)
    r = run_program("x = bytearray(512 * 1024 * 1024)\nprint('allocated', len(x))\n", limits)
    assert r.status == "failed", r
    assert "MemoryError" in r.output_tail and "allocated" not in r.output_tail
    # the same allocation passes under the default 2 GiB, so it is the limit that stopped it
    assert run_program("x = bytearray(64 * 1024 * 1024)\n", limits).passed


def test_file_bigger_than_file_bytes_fails():
    limits = SandboxLimits(file_bytes=1 * MIB)
    write = "with open('big.bin', 'wb') as f:\n    f.write(b'x' * {n})\n"
    r = run_program(write.format(n=2 * MIB), limits)
    assert r.status == "failed", r
    assert "File too large" in r.output_tail or r.returncode < 0, r
    assert run_program(write.format(n=MIB // 2), limits).passed


def test_cwd_is_a_fresh_temporary_directory_removed_afterwards():
    source = "import os\nprint('CWD', os.getcwd())\nprint('FILES', sorted(os.listdir('.')))\nopen('x', 'w').write('1')\n"
    first, second = run_many([source, source], workers=2)
    dirs = []
    for r in (first, second):
        assert r.passed, r
        lines = dict(line.split(" ", 1) for line in r.output_tail.splitlines())
        assert lines["FILES"] == "['program.py']"
        dirs.append(lines["CWD"])
    assert dirs[0] != dirs[1]
    for d in dirs:
        assert os.path.isabs(d) and not os.path.exists(d), d


def test_run_many_keeps_order():
    results = run_many([f"import sys\nprint({i})\nsys.exit({i % 2})\n" for i in range(6)], workers=3)
    assert [r.output_tail.strip() for r in results] == [str(i) for i in range(6)]
    assert [r.status for r in results] == ["passed", "failed"] * 3
    with pytest.raises(EvalError, match="workers"):
        run_many(["pass"], workers=0)


CONNECT = """\
import socket, sys
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=3).close()
except OSError as e:
    print("REFUSED", e)
    sys.exit(1)
print("CONNECTED")
"""


def test_no_network_inside_the_sandbox(monkeypatch):
    if not network_isolation():
        pytest.skip("network isolation is off here: `unshare --net --map-root-user true` fails "
                    "(no unshare binary or user namespaces disabled)")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        r = run_program(CONNECT.format(port=port))
        assert r.status == "failed" and "REFUSED" in r.output_tail and "CONNECTED" not in r.output_tail, r
        # control: the same program without the namespace reaches the listening socket
        monkeypatch.setattr(sandbox, "_unshare_path", lambda: None)
        monkeypatch.setattr(sandbox, "_bwrap_path", lambda: None)
        control = run_program(CONNECT.format(port=port))
        assert control.passed and "CONNECTED" in control.output_tail, control


def test_limits_are_validated():
    with pytest.raises(EvalError, match="timeout_s.*-1"):
        SandboxLimits(timeout_s=-1)
    with pytest.raises(EvalError, match="memory_bytes.*0"):
        SandboxLimits(memory_bytes=0)
    with pytest.raises(EvalError, match="open_files"):
        SandboxLimits(open_files=4)
    assert SandboxLimits(timeout_s=2.5).cpu_s == 4
    assert replace(SandboxLimits(), cpu_s=3).cpu_s == 3
    with pytest.raises(EvalError, match="must be a str"):
        run_program(b"print(1)")


def test_check_sandbox_passes_with_defaults_and_refuses_a_broken_one():
    check_sandbox()
    broken = SandboxLimits(memory_bytes=8 * MIB)  # too little address space for the interpreter to start
    r = run_program("print(1)", broken)
    assert not r.passed, r
    with pytest.raises(EvalError, match="SANDBOX BROKEN.*known-good") as info:
        check_sandbox(broken)
    assert f"returncode {r.returncode}" in str(info.value)
