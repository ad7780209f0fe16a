"""Tensor-parallel training (`codefill train --tp N`): checkpoints of a model whose weights are cut over the
ranks.

Every rank builds the plain Transformer and `sharding.shard_transformer` cuts it exactly as serving does; the
parallel Cells it puts in carry the backward that training needs (tp_cells.py), so the trainer runs the same
loss Cell at any TP size. What that gives the optimiser (optimizer.py, `sharded` names): a sharded tensor's
gradient is the gradient of its own slice, and a replicated tensor (embedding, RMSNorm gains) gets the whole
gradient, identical on every rank, so replicated weights and their AdamW state stay equal on all ranks without
communication. Clipping uses the true global norm (one AllReduce of a scalar).

Checkpoints are the same files as at TP=1: `ShardGatherer` all-gathers every sharded weight and its AdamW
moments in one compiled graph (every rank takes part; rank 0 writes), checking on the way that the replicated
tensors are still bit-identical on every rank, and `shard_state` cuts a full checkpoint for one rank on
resume. So a TP run resumes exactly, and may also be resumed with another --tp (not bit-exactly: the
reduction order changes). Which sizes and options are allowed: `train_config.check_train_tp`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from codefill.inference_workers.sharding import shard_tensor, split_axis

from .train_error import TrainError

OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.")


def _weight_name(name: str) -> str:
    """The weight a tensor of a checkpoint belongs to: `adam_m.layers.0.attention.wq.weight` -> the weight."""
    for prefix in OPTIMIZER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def is_sharded(name: str) -> bool:
    return split_axis(_weight_name(name)) is not None


def shard_state(tensors: Mapping[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    """Rank `rank`'s slice of full checkpoint tensors (weights, adam_m.*, adam_v.*; adam_step and other
    replicated tensors whole), cut as the weight each belongs to is cut."""
    return {name: np.ascontiguousarray(shard_tensor(_weight_name(name), full, rank, world))
            for name, full in tensors.items()}


class GatherShards(nn.Cell):
    """(every rank's copy of each sharded Parameter, concatenated along axis 0 in rank order;
    [N, 2 * replicated] every rank's (sum, sum of squares) of each replicated Parameter), in one graph."""

    def __init__(self, sharded, replicated):
        super().__init__(auto_prefix=False)
        self.sharded, self.replicated = ms.ParameterTuple(sharded), ms.ParameterTuple(replicated)
        self.all_gather = ops.AllGather()

    def construct(self, dummy):
        out = ()
        for p in self.sharded:
            out = out + (self.all_gather(p),)
        prints = ()
        for p in self.replicated:
            prints = prints + (p.sum(), (p * p).sum())
        return out, self.all_gather(ops.stack(prints).reshape(1, -1))


class ShardGatherer:
    """Full tensors from every rank's shards: `gather()` is collective (every rank calls it at the same point)
    and returns {name: full float32 array} on every rank. Replicated tensors are taken from this rank, after
    checking that every rank holds the same ones (a sum and a sum of squares each, compared bit for bit): they
    get identical updates by construction, and a checkpoint must not hide it if they ever do not."""

    def __init__(self, params: Mapping[str, object], world: int):  # MindSpore Parameters by name
        self.world = world
        self.names = [n for n in params if is_sharded(n)]
        self.replicated = [n for n in params if not is_sharded(n)]
        self.params = params
        self.axes = {n: split_axis(_weight_name(n)) for n in self.names}
        self.cell = GatherShards([params[n] for n in self.names], [params[n] for n in self.replicated])

    def gather(self) -> dict[str, np.ndarray]:
        out = {n: self.params[n].asnumpy() for n in self.replicated}
        gathered, prints = self.cell(Tensor(np.zeros(1, np.float32)))
        prints = prints.asnumpy()  # [N, 2 * replicated]
        differ = sorted({self.replicated[i // 2] for i in np.nonzero((prints != prints[:1]).any(0))[0]})
        if differ:
            ranks = [r for r in range(self.world) if not np.array_equal(prints[r], prints[0])]
            raise TrainError(f"replicated tensors differ between tensor-parallel rank 0 and ranks {ranks}: "
                             f"{differ[:4]}{'...' if len(differ) > 4 else ''} ({len(differ)})")
        for name, g in zip(self.names, gathered):
            g = g.asnumpy()  # [N * d0, d1]: the ranks' shards stacked along axis 0
            if self.axes[name] == 1:  # columns were cut: [N, out, in/N] -> [out, N * in/N]
                n_out = g.shape[0] // self.world
                g = g.reshape(self.world, n_out, -1).transpose(1, 0, 2).reshape(n_out, -1)
            out[name] = np.ascontiguousarray(g)
        return {n: out[n] for n in self.params}  # in the caller's order
