"""The program every msrun rank of a serving job runs: join the job, load this rank's shard, then serve (rank 0)
or follow.

    msrun --worker_num=N --local_worker_num=N ... inference_workers/ranks.py ARGS

`codefill workers` (launch.py) builds that command line with `startup.rank_arguments`; nobody needs to type
it. Rank 0 builds the runner, compiles both graphs on every rank (`warm_up`), then hands the runner to the
serving engine, `worker.serve(runner, endpoint, ...)`, which owns the ZeroMQ socket and is the only rank that
replies. The other ranks run `coordination.follow` until rank 0 closes the runner.

`open_rank` is the part before serving; tests and the TP benchmark call it from their own msrun scripts to
drive the runner directly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from codefill.inference_workers import startup
from codefill.inference_workers.memory_plan import MemoryConfig
from codefill.inference_workers.runner import Runner
from codefill.inference_workers.sharding import TensorParallelError


def open_rank(model_dir: str | Path, tp: int, *, max_seq_len: int | None, max_batch: int, threads: int,
              run_dir: str | Path | None = None, pin: bool = True, device: str = "cpu",
              memory: MemoryConfig | None = None) -> Runner | None:
    """Join the msrun job and load this rank's shard. Rank 0 gets the warmed-up runner; any other rank follows
    rank 0's steps until it closes the runner and then gets None. pin: give each of this host's ranks its own
    cores (`startup.pin_cores`; the launcher sets CODEFILL_LOCAL_RANKS, the number of ranks on this host).
    device: this rank binds that device's id DEVICE_ID (its local rank, set by msrun) before joining, so
    `init()` picks the device's collective library (HCCL, NCCL; MindSpore's own on CPU); the launcher has
    checked it is present and planned the memory (memory_plan.py) before starting any rank."""
    from mindspore.communication import get_group_size, get_rank, init

    from codefill.inference_workers.coordination import Channel, follow
    from codefill.model.device import check_device_present, configure_mindspore

    local_rank, local_world = int(os.environ.get("DEVICE_ID", "0")), int(os.environ.get("CODEFILL_LOCAL_RANKS", "0"))
    if pin and local_world > 1:
        startup.pin_cores(local_rank, local_world)
    check_device_present(device)
    configure_mindspore(device)
    startup.set_threads(threads)
    startup.exit_with_parent()
    init()
    rank, world = get_rank(), get_group_size()
    if run_dir is not None:
        startup.write_rank_file(run_dir, rank)
    if world != tp:
        raise TensorParallelError(f"rank {rank}: msrun started {world} ranks but --tp is {tp}")
    channel = Channel(rank, world, max_batch) if world > 1 else None
    runner = Runner.from_model_dir(model_dir, max_seq_len=max_seq_len, max_batch=max_batch, rank=rank, world=world,
                                   channel=channel, compile_cache=True, device=device, memory=memory,
                                   local_ranks=max(1, local_world))
    if rank == 0:
        runner.warm_up()
        return runner
    steps = follow(runner, channel)
    print(f"codefill rank {rank}: stopped after {steps} steps", file=sys.stderr, flush=True)
    return None


def main(argv: list[str] | None = None) -> None:
    args = startup.parse_rank_arguments(argv)
    ready_file = Path(args.ready_file) if args.ready_file else None
    try:
        runner = open_rank(args.model, args.tp, max_seq_len=args.max_seq_len, max_batch=args.max_batch,
                           threads=args.threads, run_dir=args.run_dir, device=args.device,
                           memory=MemoryConfig.from_flags(args.device_memory, args.memory_fraction))
    except BaseException as e:
        if _is_rank0():
            startup.report_error(ready_file, e)
        raise
    if runner is None:  # a follower, released by rank 0
        return
    from codefill.inference_workers.stops import token_bytes_of_model_dir
    from codefill.inference_workers.worker import serve

    try:
        keys = None
        if args.curve_secret_key:
            from codefill.inference_workers.security import ServerKeys

            keys = ServerKeys(Path(args.curve_secret_key), Path(args.curve_authorized_clients))
        serve(runner, args.endpoint, table=token_bytes_of_model_dir(args.model), ready_file=ready_file,
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


if __name__ == "__main__":
    main()
