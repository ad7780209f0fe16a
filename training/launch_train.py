"""Start `codefill train --dp N` or `--tp N` as N msrun ranks of train_rank.py and supervise them
(inference_workers/launch). The TP size and what it is combined with are checked (train_config.check_train_tp)
before msrun starts, so a size that does not divide the heads, FFN or vocabulary never starts a rank."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .train_config import TrainConfig
from .train_error import TrainError

RANK_SCRIPT = Path(__file__).with_name("train_rank.py")


def train_on_ranks(model_dir: str | Path, data: str | Path, out_dir: str | Path, cfg: TrainConfig, *,
                   held_out_data: str | Path | None = None, resume: bool = False,
                   stop_after: int | None = None, timeout_s: float | None = None,
                   device: str = "cpu") -> list[float]:
    """Run the job on dp * tp ranks to the end; return rank 0's per-step losses. A failing rank raises
    TrainError with its traceback; a device not present here raises DeviceError before msrun starts."""
    import time

    from codefill.inference_workers.launch import _alive, start_job
    from codefill.model.checkpoint import CheckpointError, read_model_config
    from codefill.model.device import check_device_present

    from .train_config import check_train_tp

    try:
        arch, _, _ = read_model_config(Path(model_dir))
    except CheckpointError as e:
        raise TrainError(str(e)) from e
    check_train_tp(cfg, arch)
    check_device_present(device)
    world = cfg.dp * cfg.tp

    args = ["--model", str(Path(model_dir).absolute()), "--data", str(Path(data).absolute()),
            "--output", str(Path(out_dir).absolute()), "--config", json.dumps(cfg.to_dict()), "--device", device]
    if held_out_data is not None:
        args += ["--held-out-data", str(Path(held_out_data).absolute())]
    if resume:
        args.append("--resume")
    if stop_after is not None:
        args += ["--stop-after", str(stop_after)]
    run_dir = Path(tempfile.mkdtemp(prefix="codefill-train-"))
    args += ["--run-dir", str(run_dir)]
    job = start_job(RANK_SCRIPT, args, world, run_dir=run_dir)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            code = job.process.poll()
            if code is not None:
                if code != 0:
                    raise TrainError(f"training job (msrun) exited with status {code}:\n{job.rank_traceback()}")
                break
            pids = job.rank_pids()
            failed = [r for r, pid in pids.items() if not _alive(pid) and not (run_dir / f"done-{r}").exists()]
            if failed:
                time.sleep(0.5)  # let the log reach the file
                raise TrainError(f"training rank {failed[0]} failed:\n{job.rank_traceback(failed[0])}")
            if len(pids) == world and all((run_dir / f"done-{r}").exists() for r in range(world)):
                break  # every rank finished cleanly; msrun may take a while to notice
            if deadline is not None and time.monotonic() > deadline:
                raise TrainError(f"training on {world} ranks did not finish in {timeout_s} s:\n{job.rank_traceback()}")
            time.sleep(0.2)
    finally:
        job.stop(5)
        shutil.rmtree(run_dir, ignore_errors=True)
    return json.loads((Path(out_dir) / "rank0_losses.json").read_text())
