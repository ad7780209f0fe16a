"""Starting worker processes: spawning a single worker, the ready file, the rank command line, and what a rank
process sets up before it joins the job.

- A single worker (`spawn_worker`, used by the language server, benchmarks and tests) is
  `python -m codefill.inference_workers.worker` with its stdout and stderr in a log file of a private temp
  directory; it reports through the ready file.
- Tensor-parallel ranks are `msrun ... inference_workers/ranks.py ARGS`; `rank_arguments` writes ARGS (the
  launcher, launch.py) and `parse_rank_arguments` reads them (ranks.py), so the two cannot drift apart.
- The ready file, written atomically once by the worker or rank 0: {"status": "ready", "endpoint": ...,
  "pid": ...} after the socket is bound, or {"status": "error", "error": ..., "traceback": ...}.
- Each rank writes `rank-R.json` ({"rank", "pid"}) into the run directory once it has joined, so a launcher
  knows which process is which rank (serving and training ranks alike).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from codefill import native_logs
from codefill.inference_workers.client import WorkerError
from codefill.inference_workers.protocol import WireError, check_endpoint

SERVING_SLOTS = 4  # cache slots of a serving worker (rows of a decode step) when not given


# --- the ready file and the rank file ---------------------------------------------------------------------


def write_ready_file(path: str | Path, status: dict[str, Any]) -> None:
    """Write then rename, so the parent never reads half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


def report_error(ready_file: str | Path | None, e: BaseException) -> None:
    """The ready file of a start that failed: the error and the traceback being handled."""
    if ready_file is not None:
        write_ready_file(ready_file, {"status": "error", "error": f"{type(e).__name__}: {e}",
                                      "traceback": traceback.format_exc()})


def write_rank_file(run_dir: str | Path, rank: int) -> None:
    write_ready_file(Path(run_dir) / f"rank-{rank}.json", {"rank": rank, "pid": os.getpid()})


# --- the rank command line --------------------------------------------------------------------------------


def rank_arguments(model_dir: str | Path, tp: int, endpoint: str, *, ready_file: Path, run_dir: Path,
                   max_batch: int, threads: int, max_seq_len: int | None = None, allow_remote: bool = False,
                   curve_secret_key: Path | None = None, curve_authorized_clients: Path | None = None,
                   device: str = "cpu", device_memory_gib: float | None = None,
                   memory_fraction: float | None = None) -> list[str]:
    """The arguments of `ranks.py` for every rank of a serving job (`parse_rank_arguments` reads them)."""
    args = ["--model", str(Path(model_dir).absolute()), "--tp", str(tp), "--endpoint", endpoint,
            "--ready-file", str(ready_file), "--run-dir", str(run_dir),
            "--max-batch", str(max_batch), "--threads", str(threads), "--device", device]
    args += memory_arguments(device_memory_gib, memory_fraction)
    if max_seq_len is not None:
        args += ["--max-seq-len", str(max_seq_len)]
    if allow_remote:
        args.append("--allow-remote")
    if curve_secret_key is not None:
        args += ["--curve-secret-key", str(Path(curve_secret_key).absolute()),
                 "--curve-authorized-clients", str(Path(curve_authorized_clients).absolute())]
    return args


def parse_rank_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="inference_workers/ranks.py", description="one tensor-parallel serving rank")
    p.add_argument("--model", required=True, help="a MODEL_DIR or a directory written by `codefill split`")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size (msrun's --worker_num)")
    p.add_argument("--endpoint", required=True, help="where rank 0 binds its ZeroMQ ROUTER socket")
    p.add_argument("--ready-file", help="rank 0 writes its ready/error status JSON here")
    p.add_argument("--run-dir", help="each rank writes rank-R.json ({rank, pid}) here")
    p.add_argument("--max-seq-len", type=int, help="positions per cache slot (default: the runner's)")
    p.add_argument("--max-batch", type=int, default=SERVING_SLOTS, help="cache slots (rows of a decode step)")
    p.add_argument("--threads", type=int, default=1, help="MindSpore kernel threads of this rank")
    p.add_argument("--device", default="cpu", help="cpu, ascend or gpu; each rank binds its local rank's device")
    p.add_argument("--device-memory", type=float, help="GiB per device for the memory plan (default: measured)")
    p.add_argument("--memory-fraction", type=float, help="share of the device's memory the plan may use")
    p.add_argument("--allow-remote", action="store_true", help="rank 0 may bind a non-local endpoint")
    p.add_argument("--curve-secret-key", help="rank 0's CURVE key pair (NAME.key_secret)")
    p.add_argument("--curve-authorized-clients", help="directory of client NAME.key files allowed in")
    return p.parse_args(argv)


def memory_arguments(device_memory_gib: float | None, memory_fraction: float | None) -> list[str]:
    """The memory plan's flags of a worker or rank command line (only those given)."""
    args = [] if device_memory_gib is None else ["--device-memory", str(device_memory_gib)]
    return args + ([] if memory_fraction is None else ["--memory-fraction", str(memory_fraction)])


# --- what a rank process sets up ------------------------------------------------------------------------


def set_threads(threads: int) -> None:
    """Kernel threads of this process's MindSpore runtime (msrun ranks on one host share its cores)."""
    import mindspore as ms

    from codefill.inference_workers.sharding import TensorParallelError

    if threads < 1:
        raise TensorParallelError(f"threads per rank must be >= 1, got {threads}")
    ms.set_context(runtime_num_threads=threads)


def pin_cores(local_rank: int, local_world: int) -> list[int]:
    """Give this rank its own block of the host's cores (cores // local ranks each), for every thread it has:
    unpinned, ranks and their communication threads fight over the same cores (docs/benchmarks/ measures
    it). Threads started later inherit the mask."""
    cores = sorted(os.sched_getaffinity(0))
    per_rank = len(cores) // local_world
    if per_rank < 1:
        return cores  # more ranks than cores: nothing sensible to pin
    mine = cores[local_rank * per_rank:(local_rank + 1) * per_rank]
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), mine)
    return mine


def exit_with_parent(poll_s: float = 1.0) -> None:
    """End this process when its parent (msrun) is gone. Ranks run in their own sessions, and a follower
    blocked in a collective would otherwise outlive a killed launcher forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"codefill rank pid {os.getpid()}: parent {parent} is gone, exiting", file=sys.stderr, flush=True)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


# --- a single worker process ------------------------------------------------------------------------------

_OWNED_DIRS: dict[int, Path] = {}  # worker pid -> the temp dir spawn_worker made for it (socket, logs)


def worker_command(model_dir: str | Path, endpoint: str, ready_file: Path, *, max_seq_len: int | None = None,
                   max_batch: int | None = None, engine: Any = None, device: str = "cpu",
                   device_memory_gib: float | None = None, memory_fraction: float | None = None) -> list[str]:
    """`python -m codefill.inference_workers.worker ...` (the `codefill worker` command) for spawn_worker."""
    cmd = [sys.executable, "-m", "codefill.inference_workers.worker", "--model", str(model_dir),
           "--endpoint", endpoint, "--ready-file", str(ready_file), "--parent-pid", str(os.getpid()),
           "--device", device, *memory_arguments(device_memory_gib, memory_fraction)]
    if max_seq_len is not None:
        cmd += ["--max-seq-len", str(max_seq_len)]
    if max_batch is not None:
        cmd += ["--max-batch", str(max_batch)]
    if engine is not None:
        cmd += ["--max-queue", str(engine.max_queue), "--prefill-chunk", str(engine.prefill_chunk),
                "--step-timeout", str(engine.step_timeout_s), "--drain-timeout", str(engine.drain_timeout_s)]
        cmd += [] if engine.prefix_reuse else ["--no-prefix-reuse"]
        cmd += [] if engine.inflight_extension else ["--no-inflight-extension"]
        cmd += ["--speculate", str(engine.speculate)]
    return cmd


def spawn_worker(model_dir: str | Path, endpoint: str | None = None, *, timeout_s: float = 300.0,
                 max_seq_len: int | None = None, max_batch: int | None = None,
                 engine: Any = None, device: str = "cpu", device_memory_gib: float | None = None,
                 memory_fraction: float | None = None) -> tuple[subprocess.Popen, str]:
    """Start a worker on `model_dir` and wait until it is serving.

    endpoint None: a private ipc:// socket in a new temp directory (mode 0700, so only this user can
    connect). Returns (process, the endpoint it actually bound). The worker's stdout and stderr go to
    worker.log in that directory, never to ours: a language server's stdout is its JSON-RPC channel.
    Raises WorkerError with the child's error, traceback or log tail if it exits or is not ready in time.
    Stop it with `stop_worker(process)`. max_batch: cache slots (the worker's default when None); engine: an
    engine.EngineConfig, passed as command-line flags. device: checked present here, before the worker starts;
    device_memory_gib, memory_fraction: its memory plan's (memory_plan.py).
    """
    from codefill.model.device import check_device_present

    check_device_present(device)
    tmp = Path(tempfile.mkdtemp(prefix="codefill-worker-"))
    endpoint = endpoint or f"ipc://{tmp / 'worker.sock'}"
    try:
        check_endpoint(endpoint)
    except WireError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WorkerError(str(e)) from e
    ready_file, log_path = tmp / "ready.json", tmp / "worker.log"
    cmd = worker_command(model_dir, endpoint, ready_file, max_seq_len=max_seq_len, max_batch=max_batch,
                         engine=engine, device=device, device_memory_gib=device_memory_gib,
                         memory_fraction=memory_fraction)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=native_logs.quiet_env(dict(os.environ)))
    _OWNED_DIRS[process.pid] = tmp

    def fail(why: str) -> WorkerError:
        detail = ""
        if ready_file.exists():
            status = json.loads(ready_file.read_text())
            detail = status.get("traceback") or status.get("error", "")
        if not detail:
            detail = "log tail:\n" + _tail(log_path)
        stop_worker(process)
        return WorkerError(f"worker for model {model_dir} {why}:\n{detail}")

    deadline = time.monotonic() + timeout_s
    while True:
        if ready_file.exists():
            status = json.loads(ready_file.read_text())
            if status.get("status") == "ready":
                return process, status["endpoint"]
            raise fail(f"failed to start: {status.get('error')}")
        if process.poll() is not None:
            raise fail(f"exited with status {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise fail(f"was not ready within {timeout_s} s")
        time.sleep(0.05)


def stop_worker(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after timeout_s; removes the temp directory spawn_worker made for it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    tmp = _OWNED_DIRS.pop(process.pid, None)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


def worker_log(process: subprocess.Popen) -> Path | None:
    """The log file of a worker started by spawn_worker (None once it is stopped)."""
    tmp = _OWNED_DIRS.get(process.pid)
    return tmp / "worker.log" if tmp is not None else None


def _tail(path: Path, n_bytes: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return data[-n_bytes:].decode("utf-8", "replace")
