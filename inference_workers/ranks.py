"""The program every msrun rank runs: join the job, load this rank's shard, then serve (rank 0) or follow.

    msrun --worker_num=N --local_worker_num=N ... inference_workers/ranks.py --model DIR --tp N \\
          --endpoint ipc:///tmp/x/worker.sock --ready-file /tmp/x/ready.json --threads 1

`codefill workers` (launch.py) builds that command line; nobody needs to type it. Rank 0 builds the
TensorParallelRunner, compiles both graphs on every rank (`warm_up`), then hands the runner to the serving
engine, `worker.serve(runner, endpoint, ...)`, which owns the ZeroMQ socket and is the only rank that replies.
The other ranks run `tp.follow` until rank 0 closes the runner. Each rank writes `rank-R.json` ({"rank",
"pid"}) into `--run-dir` once it has joined, so the launcher knows which process is which rank.

`open_rank` is the part before serving; tests and the TP benchmark call it from their own msrun scripts to
drive the runner directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from codefill.inference_workers.tp import Channel, RankModel, TensorParallelError, TensorParallelRunner, \
    follow, load_rank_weights


def set_threads(threads: int) -> None:
    """Kernel threads of this rank's MindSpore runtime (msrun ranks on one host share its cores)."""
    import mindspore as ms

    if threads < 1:
        raise TensorParallelError(f"threads per rank must be >= 1, got {threads}")
    ms.set_context(runtime_num_threads=threads)


def open_rank(model_dir: str | Path, tp: int, *, max_seq_len: int | None, max_batch: int, threads: int,
              run_dir: str | Path | None = None, pin: bool = True) -> TensorParallelRunner | None:
    """Join the msrun job and load this rank's shard. Rank 0 gets the warmed-up runner; any other rank follows
    rank 0's steps until it closes the runner and then gets None. pin: give each of this host's ranks its own
    cores (`pin_cores`; the launcher sets CODEFILL_LOCAL_RANKS, the number of ranks on this host)."""
    from mindspore.communication import get_group_size, get_rank, init

    from codefill.model.generate import configure_mindspore

    local_rank, local_world = int(os.environ.get("DEVICE_ID", "0")), int(os.environ.get("CODEFILL_LOCAL_RANKS", "0"))
    if pin and local_world > 1:
        pin_cores(local_rank, local_world)
    configure_mindspore()
    set_threads(threads)
    exit_with_parent()
    init()
    rank, world = get_rank(), get_group_size()
    if run_dir is not None:
        path = Path(run_dir) / f"rank-{rank}.json"
        path.with_suffix(".tmp").write_text(json.dumps({"rank": rank, "pid": os.getpid()}))
        os.replace(path.with_suffix(".tmp"), path)
    if world != tp:
        raise TensorParallelError(f"rank {rank}: msrun started {world} ranks but --tp is {tp}")
    config, weights = load_rank_weights(model_dir, rank, world)
    if max_seq_len is None:  # 2048 positions, or fewer when the model was trained for fewer
        max_seq_len = min(2048, config.max_seq_len)
    model = RankModel(config, weights, rank, world, max_seq_len=max_seq_len, max_batch=max_batch)
    del weights  # the graphs hold their own copy
    channel = Channel(rank, max_batch) if world > 1 else None
    if rank == 0:
        runner = TensorParallelRunner(model, channel)
        runner.warm_up()
        return runner
    model_warm_steps = follow(model, channel)
    print(f"codefill rank {rank}: stopped after {model_warm_steps} steps", file=sys.stderr, flush=True)
    return None


def write_ready_file(path: Path, status: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status))
    os.replace(tmp, path)


def pin_cores(local_rank: int, local_world: int) -> list[int]:
    """Give this rank its own block of the host's cores (cores // local ranks each), for every thread it has.

    Measured on the 2-core dev machine, preset "small", TP=2 with 1 thread per rank: unpinned, the two ranks
    and their communication threads fight over both cores (decode step 30.6 ms, prefill 1024 1324 ms);
    pinned one core each, 21.9 ms and 891 ms. Threads started later inherit the mask."""
    cores = sorted(os.sched_getaffinity(0))
    per_rank = len(cores) // local_world
    if per_rank < 1:
        return cores  # more ranks than cores: nothing sensible to pin
    mine = cores[local_rank * per_rank:(local_rank + 1) * per_rank]
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), mine)
    return mine


def exit_with_parent(poll_s: float = 1.0) -> None:
    """End this rank when msrun (its parent) is gone. Ranks run in their own sessions, and a follower blocked
    in a collective would otherwise outlive a killed launcher forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"codefill rank pid {os.getpid()}: parent {parent} is gone, exiting", file=sys.stderr, flush=True)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    ready_file = Path(args.ready_file) if args.ready_file else None
    runner = None
    try:
        runner = open_rank(args.model, args.tp, max_seq_len=args.max_seq_len, max_batch=args.max_batch,
                           threads=args.threads, run_dir=args.run_dir)
    except BaseException as e:
        if ready_file is not None and _is_rank0():
            write_ready_file(ready_file, {"status": "error", "error": f"{type(e).__name__}: {e}",
                                          "traceback": traceback.format_exc()})
        raise
    if runner is None:  # a follower, released by rank 0
        return
    from codefill.inference_workers.stops import token_bytes
    from codefill.inference_workers.tp import tokenizer_path
    from codefill.inference_workers.worker import serve

    try:
        keys = None
        if args.curve_secret_key:
            from codefill.inference_workers.security import ServerKeys

            keys = ServerKeys(Path(args.curve_secret_key), Path(args.curve_authorized_clients))
        serve(runner, args.endpoint, table=token_bytes(tokenizer_path(args.model)), ready_file=ready_file,
              allow_remote=args.allow_remote, keys=keys)
    finally:
        if runner.busy:
            # The engine gave up on a step that never returned (a rank died or hung inside a collective): the
            # model thread cannot be unwound, and a STOP broadcast would block behind it. Exit; the launcher
            # sees rank 0 gone and kills the job.
            print("codefill rank 0: a model step is still running after serve returned; exiting",
                  file=sys.stderr, flush=True)
            os._exit(3)
        runner.close()


def _is_rank0() -> bool:
    try:
        from mindspore.communication import get_rank

        return get_rank() == 0
    except Exception:  # init() itself failed: the launcher shows the log either way
        return False


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="inference_workers/ranks.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a MODEL_DIR or a directory written by `codefill split`")
    p.add_argument("--tp", type=int, required=True, help="tensor-parallel size (msrun's --worker_num)")
    p.add_argument("--endpoint", required=True, help="where rank 0 binds its ZeroMQ ROUTER socket")
    p.add_argument("--ready-file", help="rank 0 writes its ready/error status JSON here")
    p.add_argument("--run-dir", help="each rank writes rank-R.json ({rank, pid}) here")
    p.add_argument("--max-seq-len", type=int, help="positions per cache slot (default: 2048, or the model's own if fewer)")
    p.add_argument("--max-batch", type=int, default=1, help="cache slots (rows of a decode step)")
    p.add_argument("--threads", type=int, default=1, help="MindSpore kernel threads of this rank")
    p.add_argument("--allow-remote", action="store_true", help="rank 0 may bind a non-local endpoint")
    p.add_argument("--curve-secret-key", help="rank 0's CURVE key pair (NAME.key_secret)")
    p.add_argument("--curve-authorized-clients", help="directory of client NAME.key files allowed in")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
