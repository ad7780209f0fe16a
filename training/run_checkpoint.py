"""Checkpoints of a training run: OUT/checkpoints/step-NNNNNNNN/, written atomically, the last K kept.

    step-00000040/
      trained.safetensors   the trained tensors: every weight (full finetune) or the LoRA adapters
      optimizer.safetensors adam_m.*, adam_v.*, adam_step (float32)
      state.json            {"format": "codefill-train-state", "version": 1, "step", "config", "base_model",
                             "metrics_lines"}  (the data order is a function of (seed, step): nothing else)
      COMPLETE              written last; a directory without it is never read

The directory is filled under a temporary name (every file fsynced), COMPLETE is written and fsynced, and
the directory is renamed into place (model/checkpoint.atomic_directory), so a crash at any point leaves
either no new checkpoint or a whole one. Older checkpoints are deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from codefill.model.checkpoint import atomic_directory, write_json_synced
from codefill.model.safetensors_io import SafetensorsError, read_safetensors, write_safetensors

from .train_error import TrainError

STATE_FORMAT, STATE_VERSION = "codefill-train-state", 1
TRAINED, OPTIMIZER, STATE, COMPLETE = "trained.safetensors", "optimizer.safetensors", "state.json", "COMPLETE"


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:08d}"


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / COMPLETE).is_file())


def save_checkpoint(out_dir: str | Path, step: int, trained: dict[str, np.ndarray], optimizer: dict[str, np.ndarray],
                    state: dict, keep_last: int) -> Path:
    path = checkpoint_dir(out_dir, step)
    with atomic_directory(path, overwrite=True) as tmp:
        write_safetensors(tmp / TRAINED, {k: np.ascontiguousarray(v, np.float32) for k, v in trained.items()},
                          {"format": STATE_FORMAT})
        write_safetensors(tmp / OPTIMIZER, {k: np.ascontiguousarray(v, np.float32).reshape(np.shape(v))
                                            for k, v in optimizer.items()}, {"format": STATE_FORMAT})
        write_json_synced(tmp / STATE, {"format": STATE_FORMAT, "version": STATE_VERSION, "step": step, **state})
        with open(tmp / COMPLETE, "w") as f:  # last: its presence means every other file is whole
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
    for old in complete_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """(trained tensors, optimiser state, state.json) of a complete checkpoint; TrainError otherwise."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise TrainError(f"checkpoint {path} is incomplete (no {COMPLETE} marker); it was interrupted while saving")
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainError(f"cannot read {path / STATE}: {e}") from e
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise TrainError(f"{path / STATE}: format {state.get('format')!r} version {state.get('version')!r}, "
                         f"expected {STATE_FORMAT!r} {STATE_VERSION}")
    try:
        trained = {k: np.array(v) for k, v in read_safetensors(path / TRAINED).items()}
        optimizer = {k: np.array(v) for k, v in read_safetensors(path / OPTIMIZER).items()}
    except (SafetensorsError, OSError) as e:
        raise TrainError(f"checkpoint {path}: {e}") from e
    return trained, optimizer, state


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1] if found else None
