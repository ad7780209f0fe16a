"""`codefill workers`: start N tensor-parallel ranks with msrun, wait until rank 0 serves, supervise, stop.

    run_workers(model_dir, tp=2)                       # the CLI: blocks until SIGTERM or a failure
    workers = start_workers(model_dir, tp=2)           # tests, generate/infill --tp: background
    ... WorkerClient(workers.endpoint) ...
    workers.stop()

The TP size is checked against the model's config (sharding.check_model_dir_for_tp) before msrun starts, so a size
that does not divide the heads, KV heads, FFN or vocabulary never starts a rank. So are the device (present
here: model/device.py) and the memory plan (memory_plan.py): the launcher chooses the cache size once and
gives the same --max-seq-len / --max-batch to every rank, which must agree.

msrun starts the ranks with whichever `python` comes first on PATH, so the launcher puts this interpreter's
bin directory first. Ranks run `inference_workers/ranks.py`; each writes `rank-R.json` (its pid) into a
private run directory, and rank 0 writes `ready.json` once it serves (or its error and traceback).

Why the launcher watches the ranks itself: a rank that dies leaves the others blocked inside a collective
(rank 0 in the next all-reduce or broadcast) forever. msrun polls its workers once a second and kills the
rest when one exits non-zero, but its scheduler then waits for the dead node's heartbeat to time out
(~40 s measured here) before msrun exits, and a rank killed by a signal is not always reported at all.
So every `poll_s` the launcher checks each rank's pid; when one has exited it kills every rank (each runs
in its own session: msrun starts them with setsid) and msrun's process group, and raises `LaunchError`
with the failing rank's traceback from msrun's log directory. Detection is bounded by `poll_s` (0.2 s).

SIGTERM to the launcher (or `Workers.stop`) sends SIGTERM to rank 0, whose engine stops admitting, drains
in-flight requests and closes the runner, which releases the followers; after `stop_timeout_s` whatever is
left is killed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from codefill import native_logs
from codefill.inference_workers.client import WorkerError
from codefill.inference_workers.memory_plan import MemoryConfig, plan_model_dir
from codefill.inference_workers.protocol import WireError
from codefill.inference_workers.security import ServerKeys, check_bind
from codefill.inference_workers.sharding import TensorParallelError, check_model_dir_for_tp
from codefill.inference_workers.startup import SERVING_SLOTS, rank_arguments
from codefill.model.device import check_device_present

RANKS_SCRIPT = Path(__file__).with_name("ranks.py")
POLL_S = 0.2


class LaunchError(WorkerError):  # a WorkerError, so a CodefillError too
    """Ranks that could not start or that failed; the message names the rank and carries its traceback."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_threads(local_ranks: int) -> int:
    """Kernel threads per rank: the host's cores shared evenly by its ranks, at least one."""
    return max(1, (os.cpu_count() or 1) // local_ranks)


def msrun_env(local_ranks: int) -> dict[str, str]:
    env = native_logs.quiet_env(dict(os.environ))  # MindSpore's C++ log: errors only, into a file
    env["CODEFILL_LOCAL_RANKS"] = str(local_ranks)  # startup.pin_cores splits this host's cores by it
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def msrun_command(script: str | Path, script_args: list[str], tp: int, *, log_dir: Path,
                  master_addr: str = "127.0.0.1", master_port: int, nnodes: int = 1, node_rank: int = 0) -> list[str]:
    if nnodes < 1 or tp % nnodes:
        raise TensorParallelError(f"tensor-parallel size {tp} cannot be spread evenly over {nnodes} nodes")
    if not 0 <= node_rank < nnodes:
        raise TensorParallelError(f"node rank {node_rank} out of range [0, {nnodes})")
    msrun = Path(sys.executable).with_name("msrun")
    return [str(msrun) if msrun.exists() else "msrun", f"--worker_num={tp}", f"--local_worker_num={tp // nnodes}",
            f"--master_addr={master_addr}", f"--master_port={master_port}", f"--node_rank={node_rank}",
            f"--log_dir={log_dir}", "--join=True", str(script), *script_args]


@dataclass
class Job:
    """An msrun job: the msrun process, its log directory, and the run directory where ranks leave pids."""
    process: subprocess.Popen
    run_dir: Path
    log_dir: Path
    n_local: int  # ranks on this node
    owns_run_dir: bool = True
    endpoint: str | None = None
    _pids: dict[int, int] = field(default_factory=dict)  # rank -> pid, as ranks report in
    dead: list[int] = field(default_factory=list)  # ranks found exited by the last failure() check

    def rank_pids(self) -> dict[int, int]:
        for path in self.run_dir.glob("rank-*.json"):
            try:
                info = json.loads(path.read_text())
                self._pids[int(info["rank"])] = int(info["pid"])
            except (OSError, ValueError, KeyError):
                continue  # being written
        return dict(self._pids)

    def failure(self) -> str | None:
        """None while every rank that has reported in is alive and msrun runs; else what went wrong.

        Every rank found exited is named (and kept in `dead`): when one dies, the others often fail in
        their next collective within the same poll interval, and which went first cannot be told apart."""
        self.dead = [rank for rank, pid in sorted(self.rank_pids().items()) if not _alive(pid)]
        if self.dead:
            pids = self.rank_pids()
            names = ", ".join(f"rank {rank} (pid {pids[rank]})" for rank in self.dead)
            return f"{names} exited"
        code = self.process.poll()
        if code is not None:
            return f"msrun exited with status {code}"
        return None

    def rank_traceback(self, rank: int | list[int] | None = None) -> str:
        """The last traceback in a rank's log (several ranks' for a list, every rank's for None), or the
        logs' tails."""
        if isinstance(rank, list):
            return "\n".join(rank_tracebacks(self.log_dir, r) for r in rank) if rank else rank_tracebacks(self.log_dir)
        return rank_tracebacks(self.log_dir, rank)

    def kill(self) -> None:
        """SIGKILL every rank (each in its own session) and msrun's process group (msrun, its scheduler)."""
        for pid in list(self.rank_pids().values()) + _descendants(self.process.pid):
            _killpg(pid)
        _killpg(self.process.pid)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM to rank 0 (it drains and releases the others), wait up to timeout_s, then kill. Returns
        msrun's exit status (negative: killed)."""
        pids = self.rank_pids()
        if self.process.poll() is None:
            target = pids.get(0)
            if target is not None and _alive(target):
                os.kill(target, signal.SIGTERM)
            else:
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        if self.owns_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.process.returncode

    def wait(self, stop_requested=lambda: False) -> None:
        """Supervise until msrun ends cleanly; raise LaunchError (after killing the job) if a rank fails."""
        while True:
            if stop_requested():
                return
            why = self.failure()
            if why is not None:
                if why.startswith("msrun") and self.process.returncode == 0:
                    return
                time.sleep(POLL_S)  # let the dying rank's log reach the file
                self.kill()
                raise LaunchError(f"tensor-parallel job failed: {why}\n{self.rank_traceback(self.dead)}")
            time.sleep(POLL_S)


def start_job(script: str | Path, script_args: list[str], tp: int, *, run_dir: Path | None = None,
              log_dir: Path | None = None, master_addr: str = "127.0.0.1", master_port: int | None = None,
              nnodes: int = 1, node_rank: int = 0) -> Job:
    """Start msrun on `script` in the background (a new session, the right PATH)."""
    owns = run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="codefill-workers-")) if run_dir is None else Path(run_dir)
    log_dir = Path(log_dir) if log_dir is not None else run_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = master_port if master_port is not None else free_port(master_addr if nnodes == 1 else "0.0.0.0")
    cmd = msrun_command(script, script_args, tp, log_dir=log_dir, master_addr=master_addr, master_port=port,
                        nnodes=nnodes, node_rank=node_rank)
    with open(log_dir / "msrun.log", "wb") as out:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   env=msrun_env(tp // nnodes), start_new_session=True)
    return Job(process, run_dir, log_dir, tp // nnodes, owns)


def start_workers(model_dir: str | Path, tp: int, endpoint: str | None = None, *, master_addr: str = "127.0.0.1",
                  master_port: int | None = None, nnodes: int = 1, node_rank: int = 0,
                  log_dir: str | Path | None = None, ready_timeout_s: float = 600.0, max_seq_len: int | None = None,
                  max_batch: int | None = None, threads: int | None = None, allow_remote: bool = False,
                  keys: ServerKeys | None = None, device: str = "cpu",
                  memory: MemoryConfig | None = None) -> Job:
    """Validate, start msrun on ranks.py, and return once rank 0 serves (`job.endpoint`) or, on a node other
    than 0, once its ranks have joined. Raises TensorParallelError before starting anything if `tp` does
    not fit the model, DeviceError if `device` is not present, MemoryPlanError if the model does not fit its
    memory, LaunchError (with the failing rank's traceback) if a rank fails or time runs out. max_seq_len /
    max_batch None: chosen by the memory plan (at most the defaults: 2048, SERVING_SLOTS slots)."""
    check_model_dir_for_tp(model_dir, tp)
    check_device_present(device)
    if endpoint is not None:
        try:
            check_bind(endpoint, allow_remote, keys)  # before any rank starts
        except WireError as e:
            raise LaunchError(str(e)) from e
    if nnodes < 1 or tp % nnodes:
        raise TensorParallelError(f"tensor-parallel size {tp} cannot be spread evenly over {nnodes} nodes")
    memory = memory or MemoryConfig()
    plan = plan_model_dir(model_dir, tp, device, memory, max_seq_len=max_seq_len, max_batch=max_batch,
                          default_max_batch=SERVING_SLOTS, local_ranks=tp // nnodes)
    run_dir = Path(tempfile.mkdtemp(prefix="codefill-workers-"))  # mode 0700: a private ipc:// socket
    endpoint = endpoint or f"ipc://{run_dir / 'worker.sock'}"
    ready_file = run_dir / "ready.json"
    args = rank_arguments(model_dir, tp, endpoint, ready_file=ready_file, run_dir=run_dir,
                          max_batch=plan.max_batch, threads=threads or default_threads(tp // nnodes),
                          max_seq_len=plan.max_seq_len, allow_remote=allow_remote,
                          curve_secret_key=keys.secret_key_file if keys is not None else None,
                          curve_authorized_clients=keys.authorized_clients if keys is not None else None,
                          device=device, device_memory_gib=memory.device_memory_gib,
                          memory_fraction=memory.fraction)
    job = start_job(RANKS_SCRIPT, args, tp, run_dir=run_dir, log_dir=Path(log_dir) if log_dir else None,
                    master_addr=master_addr, master_port=master_port, nnodes=nnodes, node_rank=node_rank)
    job.owns_run_dir = True
    deadline = time.monotonic() + ready_timeout_s
    try:
        while True:
            if node_rank == 0 and ready_file.exists():
                status = json.loads(ready_file.read_text())
                if status.get("status") == "ready":
                    job.endpoint = status.get("endpoint", endpoint)
                    return job
                raise LaunchError(f"rank 0 failed to start: {status.get('error')}\n{status.get('traceback', '')}")
            if node_rank != 0 and len(job.rank_pids()) == job.n_local:
                return job
            why = job.failure()
            if why is not None:
                time.sleep(POLL_S)
                raise LaunchError(f"tensor-parallel workers for {model_dir} failed to start: {why}\n"
                                  f"{job.rank_traceback(job.dead)}")
            if time.monotonic() > deadline:
                raise LaunchError(f"tensor-parallel workers for {model_dir} were not ready within "
                                  f"{ready_timeout_s} s\n{job.rank_traceback()}")
            time.sleep(POLL_S)
    except BaseException:
        job.kill()
        if log_dir is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def run_workers(model_dir: str | Path, tp: int, endpoint: str | None = None, *, master_addr: str = "127.0.0.1",
                master_port: int | None = None, nnodes: int = 1, node_rank: int = 0,
                log_dir: str | Path | None = None, ready_timeout_s: float = 600.0, stop_timeout_s: float = 30.0,
                max_seq_len: int | None = None, max_batch: int | None = None, threads: int | None = None,
                allow_remote: bool = False, keys: ServerKeys | None = None, device: str = "cpu",
                memory: MemoryConfig | None = None) -> int:
    """`codefill workers`: start, print the endpoint, supervise until SIGTERM/SIGINT (then drain and stop: 0)
    or a rank failure (LaunchError with its traceback; the CLI exits non-zero)."""
    stop = {"requested": False}

    def on_signal(signum, frame):
        stop["requested"] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        job = start_workers(model_dir, tp, endpoint, master_addr=master_addr, master_port=master_port,
                            nnodes=nnodes, node_rank=node_rank, log_dir=log_dir, ready_timeout_s=ready_timeout_s,
                            max_seq_len=max_seq_len, max_batch=max_batch, threads=threads,
                            allow_remote=allow_remote, keys=keys, device=device, memory=memory)
        where = job.endpoint if node_rank == 0 else f"node {node_rank} (rank 0 serves on node 0)"
        print(f"codefill workers: {tp} ranks ready, serving on {where}; logs in {job.log_dir}", flush=True)
        job.wait(lambda: stop["requested"])  # LaunchError (job already killed) if a rank fails
        code = job.stop(stop_timeout_s)
        return 0 if code == 0 or stop["requested"] else 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def generate_with_workers(model_dir: str | Path, tp: int, prompt_ids: list[int], max_new_tokens: int,
                          sampling=None, stop_ids=(), *, max_seq_len: int | None = None,
                          ready_timeout_s: float = 600.0, request_timeout_s: float = 300.0,
                          device: str = "cpu") -> list[tuple[int, float]]:
    """`codefill generate/infill --tp N`: start N ranks, run one request through rank 0's socket, stop them.
    Returns (token id, log-prob) pairs, as Runner.generate yields them; `sampling` as WorkerClient takes it."""
    from codefill.inference_workers.client import WorkerClient

    job = start_workers(model_dir, tp, max_seq_len=max_seq_len or len(prompt_ids) + max_new_tokens, max_batch=1,
                        ready_timeout_s=ready_timeout_s, device=device)
    try:
        with WorkerClient(job.endpoint, timeout_s=request_timeout_s) as client:
            tokens, _ = client.complete(prompt_ids, max_new_tokens, sampling, list(stop_ids))
        return [(t.token_id, t.logprob) for t in tokens]
    finally:
        job.stop()


# --- processes and logs -----------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Running and not a zombie (msrun reaps its workers only once a second)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                kids = [int(c) for c in children.read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _killpg(pid: int) -> None:
    try:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def rank_tracebacks(log_dir: Path, rank: int | None = None, tail_lines: int = 30) -> str:
    """For one rank (worker_R.log, single node) or all: its last Python traceback, else its log's tail."""
    paths = [Path(log_dir) / f"worker_{rank}.log"] if rank is not None else sorted(Path(log_dir).glob("worker_*.log"))
    parts = []
    for path in paths:
        try:
            lines = [ln for ln in path.read_text(errors="replace").splitlines()
                     if not ln.startswith(("[INFO]", "[WARNING]", "[DEBUG]"))]
        except OSError as e:
            parts.append(f"--- {path.name}: cannot read: {e}")
            continue
        starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
        if starts:
            parts.append(f"--- {path.name} (traceback) ---\n" + "\n".join(lines[starts[-1]:][:200]))
        elif rank is not None or lines:
            parts.append(f"--- {path.name} (last lines) ---\n" + "\n".join(lines[-tail_lines:]))
    return "\n".join(parts) if parts else f"(no rank logs in {log_dir})"


if __name__ == "__main__":  # `python -m codefill.inference_workers.launch ...` is `codefill workers ...`
    from codefill.cli import main

    sys.exit(main(["workers", *sys.argv[1:]]))
