"""Running one untrusted Python program per subprocess, inside bubblewrap where it runs, with resource limits.

    result = run_program(source, SandboxLimits(timeout_s=10))   # ExecResult(status, returncode, seconds, ...)
    results = run_many(sources, limits, workers=2)             # in order, two subprocesses at a time
    check_sandbox(limits)                                       # the isolation in force; EvalError unless
                                                                # known programs behave

Isolation, the strongest that runs here (`isolation()`, probed once per process):

    "bubblewrap"   bwrap --ro-bind / / --size TMP --tmpfs /tmp --proc /proc --dev /dev --tmpfs $HOME
                         --size TMP --tmpfs WORK --ro-bind WORK/program.py WORK/program.py
                         --unshare-all --die-with-parent --new-session --chdir WORK --
                   The whole filesystem read-only except the program's own scratch directory WORK, which is a
                   tmpfs of at most tmp_bytes (a disk bomb fills that, never the host's disk) holding only
                   program.py, read-only; a private, size-bounded /tmp; the evaluator's home directory replaced by an empty tmpfs (nothing in it
                   can be read, nothing written there outlives the program; only the Python installation and
                   virtual environment, when /tmp or home holds them, are bound back read-only); its own PID
                   namespace (its
                   parent is bwrap's init, pid 1: the evaluator cannot be seen or signalled, and when the
                   program exits the kernel kills everything it left in the namespace, a setsid() child
                   included), network namespace (no interface but a loopback that is down), IPC, UTS and
                   cgroup namespaces; killed with the evaluator (PR_SET_PDEATHSIG). `scripts/setup.sh`
                   installs bubblewrap.
    "unshare-net"  [unshare --net --map-root-user --] only: no network, but the program can write wherever
                   the user can, read the home directory and signal the evaluator. A warning says so.
    "none"         rlimits only, with the host's network. A warning says so.

What runs, for each program:

    ISOLATION sys.executable -I -S -B program.py

- `program.py` is written into a fresh `tempfile.TemporaryDirectory()`, which is the process's cwd, HOME and
  TMPDIR, and is removed afterwards. The environment is only PATH=/usr/bin:/bin, HOME, TMPDIR, LANG=C.UTF-8
  (and PWD, which bubblewrap sets).
- `-I` (isolated: no user site directory, PYTHON* variables ignored, script directory not trusted beyond
  itself), `-S` (no `site`: no site-packages, so the program sees the standard library only), `-B` (no .pyc).
- stdin is /dev/null; stdout and stderr go together into an unnamed temporary file (not a pipe: a grandchild
  that keeps the pipe open cannot stall us, and RLIMIT_FSIZE bounds the output too). The last ~2000
  characters come back in `ExecResult.output_tail`.
- `start_new_session=True`: the program leads a new session and process group. On the wall-clock timeout the
  whole group gets SIGKILL (`os.killpg`), so children and grandchildren die too; after a normal exit the
  group is killed as well, so nothing the program left running survives it. (A program that calls setsid()
  itself leaves the group; only bubblewrap's PID namespace catches that one.)
- rlimits, set in `preexec_fn` between fork and exec: RLIMIT_AS (memory_bytes), RLIMIT_FSIZE (file_bytes),
  RLIMIT_NPROC (max_processes; Linux does not enforce it for root or a process with CAP_SYS_RESOURCE, so on a
  root machine it is a no-op), RLIMIT_NOFILE (open_files), RLIMIT_CPU (cpu_s; SIGXCPU, then SIGKILL a second
  later) and RLIMIT_CORE 0. RLIMIT_AS is set last: the forked child still has the parent's address space
  (a loaded model: gigabytes), and any allocation between a low RLIMIT_AS and exec would fail. The function
  does nothing but setrlimit calls on values computed in the parent, which is what keeps `preexec_fn` safe
  enough in a process with threads (the run_many pool, MindSpore's pools).
- Network: bubblewrap's network namespace, or (without bubblewrap) `unshare --net --map-root-user` where the
  kernel allows unprivileged user namespaces (or we are root): a new, empty network namespace whose only
  interface is a loopback that is down, so every connect() fails, to 127.0.0.1 included.
  `network_isolation()` says whether either is on; without it programs run with the host's network, and
  reports must say so.

What bubblewrap does not isolate: the program still runs as our user (root on the training machines) and
reads the rest of the filesystem (system files, the project, other users' readable files); CPU time and
memory are bounded by the rlimits and the wall clock, not by a cgroup, so a fork bomb is stopped by the
timeout (and RLIMIT_NPROC where it applies), not prevented; a kernel exploit escapes any namespace.

status: "passed" iff the return code is 0; "timeout" when the wall clock ran out or RLIMIT_CPU killed it
(SIGXCPU, or SIGKILL after more CPU seconds than the soft limit); otherwise "failed".
"""

from __future__ import annotations

import functools
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from .eval_error import EvalError

GIB = 1 << 30
MIB = 1 << 20
OUTPUT_TAIL_CHARS = 2000
PROGRAM_NAME = "program.py"
STATUSES = ("passed", "failed", "timeout")


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, from start to SIGKILL of the process group
    memory_bytes: int = 2 * GIB  # RLIMIT_AS (address space, not resident memory)
    file_bytes: int = 16 * MIB  # RLIMIT_FSIZE: largest file the program may write, its output included
    max_processes: int = 64  # RLIMIT_NPROC: per real user id; not enforced for root / CAP_SYS_RESOURCE
    open_files: int = 256  # RLIMIT_NOFILE
    cpu_s: int | None = None  # RLIMIT_CPU soft limit in seconds; None: ceil(timeout_s) + 1
    tmp_bytes: int = 64 * MIB  # size of bubblewrap's private /tmp (a tmpfs: memory)

    def __post_init__(self):
        t = self.timeout_s
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t <= 0:
            raise EvalError(f"SandboxLimits.timeout_s must be a finite number of seconds > 0, got {t!r}")
        if self.cpu_s is None:
            object.__setattr__(self, "cpu_s", math.ceil(t) + 1)
        for name in ("memory_bytes", "file_bytes", "max_processes", "open_files", "cpu_s", "tmp_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise EvalError(f"SandboxLimits.{name} must be a positive integer, got {v!r}")
        if self.open_files < 16:
            raise EvalError(f"SandboxLimits.open_files must be >= 16 (the interpreter needs a few), "
                            f"got {self.open_files}")


@dataclass(frozen=True)
class ExecResult:
    status: str  # "passed" | "failed" | "timeout"
    returncode: int  # negative: killed by that signal (-9 after a timeout)
    seconds: float  # wall clock of the subprocess
    output_tail: str  # last ~2000 characters of stdout and stderr together

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def describe(self) -> str:
        """One block for error messages: status, return code, time, then the output tail."""
        tail = self.output_tail.rstrip() or "(no output)"
        return f"status {self.status}, returncode {self.returncode}, {self.seconds:.2f} s; output tail:\n{tail}"


# --- isolation -------------------------------------------------------------------------------------------

ISOLATIONS = ("bubblewrap", "unshare-net", "none")


def _binary(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/bin/{name}") if os.path.isfile(p)), None)


def _works(command: list[str]) -> bool:
    try:
        probe = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def _interpreter_paths() -> list[str]:
    """The directories of the Python that runs evaluated programs: its virtual environment and installation."""
    return sorted({os.path.abspath(sys.prefix), os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)})


def _bwrap_prefix(bwrap: str, work: str, limits: SandboxLimits) -> list[str]:
    """The bubblewrap command line of the module docstring, up to and including `--`."""
    command = [bwrap, "--ro-bind", "/", "/", "--size", str(limits.tmp_bytes), "--tmpfs", "/tmp",
               "--proc", "/proc", "--dev", "/dev"]
    hidden = ["/tmp"]
    home = os.path.realpath(os.path.expanduser("~"))
    if home != "/" and os.path.isdir(home) and not home.startswith("/tmp/") and \
            not os.path.realpath(work).startswith(home + os.sep):
        command += ["--tmpfs", home]
        hidden.append(home)
    # The interpreter the program runs with, where the private /tmp or home would hide it: a pyenv Python
    # under the home directory, a virtual environment under /tmp (a fresh clone's .venv). Read-only.
    for path in _interpreter_paths():
        if any(path == h or path.startswith(h + os.sep) for h in hidden):
            command += ["--ro-bind", path, path]
    program = os.path.join(work, PROGRAM_NAME)
    return command + ["--size", str(limits.tmp_bytes), "--tmpfs", work, "--ro-bind", program, program,
                      "--unshare-all", "--die-with-parent", "--new-session", "--chdir", work, "--"]


@functools.cache
def _bwrap_path() -> str | None:
    """The bwrap binary if a program runs under it here with our arguments, else None (probed once)."""
    path = _binary("bwrap")
    if path is None:
        return None
    with tempfile.TemporaryDirectory(prefix="codefill-sandbox-probe-") as work:
        open(os.path.join(work, PROGRAM_NAME), "w").close()
        return path if _works(_bwrap_prefix(path, work, SandboxLimits()) + ["true"]) else None


@functools.cache
def _unshare_path() -> str | None:
    """The unshare binary if `unshare --net --map-root-user true` works here, else None (probed once)."""
    path = _binary("unshare")
    return path if path is not None and _works([path, "--net", "--map-root-user", "true"]) else None


def isolation() -> str:
    """The isolation programs run under here: one of ISOLATIONS (see the module docstring)."""
    if _bwrap_path() is not None:
        return "bubblewrap"
    return "unshare-net" if _unshare_path() is not None else "none"


def network_isolation() -> bool:
    """Whether programs run in an empty network namespace (cached for the life of the process)."""
    return isolation() != "none"


def describe_isolation(name: str) -> str:
    return {
        "bubblewrap": "bubblewrap: read-only filesystem but its scratch directory, private /tmp and home, own PID, "
                      "network and IPC namespaces, killed with the evaluator",
        "unshare-net": "WARNING: bubblewrap (bwrap) is not installed or cannot run here (install it with "
                       "scripts/setup.sh or `apt-get install bubblewrap`): programs run with rlimits and no "
                       "network only; they can write wherever this user can, read the home directory and "
                       "signal the evaluator",
        "none": "WARNING: neither bubblewrap (bwrap) nor `unshare --net` can run here: programs run with rlimits "
                "only and the host's network; they can write wherever this user can, read the home directory "
                "and signal the evaluator",
    }[name]


# --- one program ----------------------------------------------------------------------------------------


def _rlimits(limits: SandboxLimits) -> list[tuple[int, tuple[int, int]]]:
    """(resource, (soft, hard)) in the order they are set; RLIMIT_AS last (see the module docstring)."""
    return [
        (resource.RLIMIT_CORE, (0, 0)),
        (resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1)),
        (resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes)),
        (resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes)),
        (resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files)),
        (resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes)),
    ]


def _preexec(settings: list[tuple[int, tuple[int, int]]]):
    def apply() -> None:  # runs in the child between fork and exec: setrlimit calls only
        for which, values in settings:
            resource.setrlimit(which, values)

    return apply


def _read_tail(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4 * OUTPUT_TAIL_CHARS))  # up to 4 bytes a character in UTF-8
    return f.read().decode("utf-8", errors="replace")[-OUTPUT_TAIL_CHARS:]


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for the program itself to exit, without reaping it; False on timeout.

    Not reaping matters: until the zombie is reaped its pid (= our process group id) cannot be reused, so
    the killpg that follows can only reach the program's own group. Without pidfd_open, fall back to wait().
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([fd], [], [], timeout_s)
        return bool(ready)
    finally:
        os.close(fd)


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> ExecResult:
    """Run `source` as a Python program in the sandbox described in the module docstring."""
    if not isinstance(source, str):
        raise EvalError(f"a program must be a str, got {type(source).__name__}")
    bwrap, unshare = _bwrap_path(), _unshare_path()
    settings = _rlimits(limits)
    with tempfile.TemporaryDirectory(prefix="codefill-sandbox-", ignore_cleanup_errors=True) as work, \
            tempfile.TemporaryFile() as out:
        # surrogatepass: a lone surrogate becomes invalid UTF-8, which the interpreter rejects (a failure)
        with open(os.path.join(work, PROGRAM_NAME), "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(source)
        command = [sys.executable, "-I", "-S", "-B", PROGRAM_NAME]
        if bwrap is not None:
            command = _bwrap_prefix(bwrap, work, limits) + command
        elif unshare is not None:
            command = [unshare, "--net", "--map-root-user", "--"] + command
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        start = time.monotonic()
        try:
            proc = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_preexec(settings))
        except (OSError, subprocess.SubprocessError) as e:
            raise EvalError(f"cannot start the sandboxed interpreter {command}: {e}") from e
        exited = _wait_exit(proc, limits.timeout_s)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the program on timeout; whatever it left running, always
        except (ProcessLookupError, PermissionError):
            pass
        returncode = proc.wait()
        seconds = time.monotonic() - start
        tail = _read_tail(out)
    if returncode == 0:
        status = "passed"
    elif not exited or returncode == -signal.SIGXCPU:
        status = "timeout"
    else:
        status = "failed"
    return ExecResult(status, returncode, round(seconds, 4), tail)


def run_many(programs: Sequence[str], limits: SandboxLimits = SandboxLimits(), workers: int = 2) -> list[ExecResult]:
    """run_program over `programs`, `workers` at a time; results in the order of `programs`."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise EvalError(f"workers must be a positive integer, got {workers!r}")
    if not programs:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(programs)), thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda source: run_program(source, limits), programs))


# --- the known-good check -------------------------------------------------------------------------------


BWRAP_CHECKS = """\
assert os.getppid() == 1, ("not in its own PID namespace", os.getppid())
try:
    open("/codefill-sandbox-probe", "w")
    raise SystemExit("the root filesystem is writable")
except OSError:
    pass
# private: only WORK, and the directories holding a Python installation bound back read-only
assert set(os.listdir("/tmp")) <= {os.path.basename(os.getcwd())} | BOUND_UNDER_TMP, os.listdir("/tmp")
"""


def _known_good(limits: SandboxLimits, isolation_in_force: str) -> str:
    """Exercises what every evaluated program needs; also checks that our limits and isolation really are in
    force."""
    bound = {p.split(os.sep)[2] for p in _interpreter_paths() if p.startswith("/tmp/")}
    checks = f"BOUND_UNDER_TMP = {bound!r}\n" + BWRAP_CHECKS if isolation_in_force == "bubblewrap" else ""
    return "import collections, json, math, os, re, resource, sys\n" + checks + f"""\
assert math.sqrt(16) == 4.0
assert json.loads(json.dumps({{"a": [1, 2]}})) == {{"a": [1, 2]}}
assert collections.Counter("abca")["a"] == 2 and re.fullmatch(r"a+b", "aab")
with open("probe.txt", "w") as f:
    f.write("x" * 1000)
assert os.path.getsize("probe.txt") == 1000
assert os.getcwd() == os.environ["HOME"], (os.getcwd(), os.environ.get("HOME"))
assert resource.getrlimit(resource.RLIMIT_AS) == ({limits.memory_bytes}, {limits.memory_bytes})
assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == {limits.file_bytes}
assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
assert not any("site-packages" in p for p in sys.path), sys.path
print("sandbox ok")
"""


KNOWN_BAD = 'assert 1 + 1 == 3, "known-bad program: this assertion must fail"\n'
KNOWN_HANG = "while True:\n    pass\n"


def check_sandbox(limits: SandboxLimits = SandboxLimits(), warn=lambda line: print(line, file=sys.stderr)) -> str:
    """The isolation in force (one of ISOLATIONS; `warn` is told when it is not bubblewrap). Raise EvalError
    unless a known-good program passes (and sees that isolation), a failing assert fails and a busy loop times
    out (under a 1 s limit at most, so the check costs about a second). A sandbox that fails everything scores
    every model 0; this check is what tells that apart from a bad model."""
    name = isolation()
    if name != "bubblewrap":
        warn(describe_isolation(name))
    good = run_program(_known_good(limits, name), limits)
    if not good.passed or "sandbox ok" not in good.output_tail:
        raise EvalError(f"SANDBOX BROKEN: a known-good program did not pass under {limits} (scores from this "
                        f"sandbox would be meaningless): {good.describe()}")
    bad = run_program(KNOWN_BAD, limits)
    if bad.status != "failed" or "known-bad program" not in bad.output_tail:
        raise EvalError(f"SANDBOX BROKEN: a program with a failing assert was not reported as failed under "
                        f"{limits}: {bad.describe()}")
    short = replace(limits, timeout_s=min(limits.timeout_s, 1.0))
    hang = run_program(KNOWN_HANG, short)
    if hang.status != "timeout":
        raise EvalError(f"SANDBOX BROKEN: an endless loop was not stopped as a timeout under {short}: "
                        f"{hang.describe()}")
    return name
