"""`codefill merge --input SPLIT_DIR --output MODEL_DIR`: tensor-parallel shards back to one full checkpoint.

The inverse of `inference_workers/tp.split_model_dir` (the seed's transform_ckpt step): every column- or
row-parallel tensor is the concatenation of the ranks' slices along the axis `tp.split_axis` names, in rank
order; replicated tensors must be bit-identical on every rank (a difference means the shards do not come
from one model, and is refused). The stored dtype is kept, so split then merge is the identity, byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from codefill.model.checkpoint import TOKENIZER_NAME, CheckpointError, save_model_dir
from codefill.model.weights import expected_shapes

from .train_error import TrainError


def merge_split_dir(split_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    from codefill.inference_workers import tp

    split_dir = Path(split_dir)
    cfg, world = tp.read_tp_config(split_dir)
    if world is None:
        raise TrainError(f"{split_dir} has no {tp.SPLIT_NAME}: it is not a tensor-parallel split directory")
    shapes = tp.shard_shapes(cfg, world)
    shards = []
    for rank in range(world):
        try:
            shards.append(tp.read_rank_shard(split_dir, rank, world, shapes))
        except CheckpointError as e:
            raise TrainError(str(e)) from e
    full = {}
    for name in expected_shapes(cfg):
        axis = tp.split_axis(name)
        parts = [s[name] for s in shards]
        if axis is None:
            first = np.asarray(parts[0]).view(np.uint8)
            for r, p in enumerate(parts[1:], 1):
                if not np.array_equal(first, np.asarray(p).view(np.uint8)):
                    raise TrainError(f"replicated tensor {name!r} differs between rank 0 and rank {r} of {split_dir}")
            full[name] = np.array(parts[0])
        else:
            full[name] = np.concatenate([np.asarray(p) for p in parts], axis=axis)
    return save_model_dir(out_dir, cfg, full, split_dir / TOKENIZER_NAME,
                          note=f"merged from {world} tensor-parallel shards in {split_dir.absolute()}",
                          overwrite=overwrite)
