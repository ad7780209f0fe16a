"""The msrun rank script of `codefill train --dp N` / `--tp N`: join the job, then run `trainer.train` as this
rank.

    msrun --worker_num=N ... training/train_rank.py --model DIR --data DATA --output OUT --config JSON
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--config", required=True, help="TrainConfig as JSON")
    p.add_argument("--held-out-data")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--stop-after", type=int)
    p.add_argument("--run-dir", help="where each rank leaves rank-R.json with its pid (for the launcher)")
    p.add_argument("--device", default="cpu", help="cpu, ascend or gpu: this rank binds its local rank's device")
    args = p.parse_args()

    from mindspore.communication import get_group_size, get_rank, init

    from codefill.inference_workers.startup import write_rank_file
    from codefill.model.device import configure_mindspore
    from codefill.training.train_config import TrainConfig
    from codefill.training.trainer import train

    configure_mindspore(args.device)  # before init(): it picks the device's collective library (HCCL, NCCL)
    init()
    rank, world = get_rank(), get_group_size()
    if args.run_dir:
        write_rank_file(args.run_dir, rank)
    cfg = TrainConfig.from_dict(json.loads(args.config))
    result = train(args.model, args.data, args.output, cfg, held_out_data=args.held_out_data, resume=args.resume,
                   rank=rank, world=world, progress=rank == 0, stop_after=args.stop_after)
    if rank == 0:
        (Path(args.output) / "rank0_losses.json").write_text(json.dumps(result.losses))
    _barrier()  # no rank exits before rank 0 has written everything
    if args.run_dir:  # tells the launcher this rank's exit is a clean one
        (Path(args.run_dir) / f"done-{rank}").write_text("ok\n")


def _barrier() -> None:
    import numpy as np
    from mindspore import Tensor, ops

    from codefill.inference_workers.tp_cells import Collective

    Collective(ops.AllReduce())(Tensor(np.ones(1, np.float32))).asnumpy()


if __name__ == "__main__":
    main()
