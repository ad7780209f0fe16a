"""Tensor-parallel training (`codefill train --tp N`): the serving shard of the model, with a correct backward.

Every rank builds the plain Transformer and `inference_workers/tp.shard_transformer` cuts it exactly as
serving does (column-parallel wq, wk, wv, w1, w3; row-parallel wo, w2; vocab-parallel head; replicated
embedding and norms), then `shard_for_training` swaps the Cells whose backward would be wrong in training
(the row-parallel wo and w2, and the head) for the ones below, keeping their parameter names and shapes, so
`tp.shard_weights` / `tp.load_shard` fill them and the optimiser state is keyed as at TP=1.

Why not the serving Cells as they are: they call ops.AllReduce / ops.AllGather in the forward only, and
MindSpore's built-in bprops (ops/_grad_experimental/grad_comm_ops.py) are

    AllReduce(SUM)  bprop: dx = AllReduce(SUM)(dout)
    AllGather       bprop: dx = ReduceScatter(SUM)(dout)

Every rank computes the same loss from the same replicated activations, so dout is the same on every rank and
both give N times the true gradient. Megatron's two conjugate operators are what training needs:

    f  CopyToRanks      forward identity, backward AllReduce(SUM)   on the (replicated) input of a
                                                                     column-parallel matmul: each rank's input
                                                                     gradient is only its heads' / columns' share
    g  ReduceFromRanks  forward AllReduce(SUM), backward identity   on the partial sums of a row-parallel matmul
    GatherVocab         forward AllGather of the [M, V/N] logits into [M, V]; backward: this rank's [M, V/N]
                        slice of dout (not ReduceScatter: dout is already whole on every rank)

They are parameter-free Cells with a custom `bprop` (honoured in graph mode). The training forward
(train_network.py, `replicated_input`) passes each normed hidden state through f once before the matmuls that
read it: wq, wk, wv share one f, w1 and w3 another, the head a third. So a layer all-reduces [B, T, dim] twice
forward (g after wo and w2) and twice backward (f before attention and before the FFN), not once per
column-parallel projection (five times) as an f inside every projection would; the head adds one AllGather
of the [B*T, V/N] logits forward and one AllReduce backward per micro-batch.

What that gives the optimiser (optimizer.py, `sharded` names): a sharded tensor's gradient is the gradient of
its own slice, and a replicated tensor (embedding, RMSNorm gains) gets the whole gradient, identical on every
rank (its inputs and output gradients are replicated), so replicated weights and their AdamW state stay equal
on all ranks without communication. Clipping uses the true global norm: the squared norms of the sharded
gradients are summed over the ranks (one AllReduce of a scalar) and the replicated ones counted once.

Checkpoints are the same files as at TP=1: `ShardGatherer` all-gathers every sharded weight and its AdamW
moments in one compiled graph (every rank takes part; rank 0 writes), checking on the way that the replicated
tensors are still bit-identical on every rank, and `shard_state` cuts a full checkpoint for one rank on
resume. So a TP run resumes exactly, and may also be resumed with another --tp (not bit-exactly: the
reduction order changes).

Not supported, refused by `check_train_tp` before any rank starts: --tp with --dp > 1 (it would need separate
TP and DP communication groups; every collective here uses the world group) and --tp with LoRA (a replicated
LoRA A on a column-parallel projection receives only a partial gradient per rank and needs its own reduction).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np

from .train_config import TrainConfig
from .train_error import TrainError

OPTIMIZER_PREFIXES = ("adam_m.", "adam_v.")


def check_train_tp(cfg: TrainConfig, arch) -> None:
    """Raise TrainError unless `cfg.tp` ranks can train this architecture with this config."""
    from codefill.inference_workers.tp import TensorParallelError, check_tp

    if cfg.tp == 1:
        return
    if cfg.dp > 1:
        raise TrainError(f"--tp {cfg.tp} with --dp {cfg.dp} is not supported: use tensor parallelism or data "
                         f"parallelism, not both (dp 1 with tp {cfg.tp}, or tp 1 with dp {cfg.dp})")
    if cfg.lora is not None:
        raise TrainError(f"--tp {cfg.tp} trains the full model only; LoRA (rank {cfg.lora.rank}, targets "
                         f"{','.join(cfg.lora.targets)}) with tensor parallelism is not supported: pass --full "
                         f"(or --preset full), or train LoRA with --tp 1")
    try:
        check_tp(arch, cfg.tp)
    except TensorParallelError as e:
        raise TrainError(f"cannot train with --tp {cfg.tp}: {e}") from e


@functools.cache
def _cells():
    import mindspore as ms
    from mindspore import Parameter, nn, ops
    from mindspore.common.initializer import initializer

    class CopyToRanks(nn.Cell):
        """f: identity forward; the input gradient, a per-rank partial, is summed over the ranks."""

        def __init__(self):
            super().__init__()
            self.all_reduce = ops.AllReduce()

        def construct(self, x):
            return x

        def bprop(self, x, out, dout):
            return (self.all_reduce(dout),)

    class ReduceFromRanks(nn.Cell):
        """g: sum of the ranks' partial outputs; the output gradient is already whole on every rank."""

        def __init__(self):
            super().__init__()
            self.all_reduce = ops.AllReduce()

        def construct(self, x):
            return self.all_reduce(x)

        def bprop(self, x, out, dout):
            return (dout,)

    class GatherVocab(nn.Cell):
        """[M, V/N] on each rank -> [M, V] (rank r's columns at [r*V/N, (r+1)*V/N)); backward keeps this
        rank's columns of the gradient."""

        def __init__(self, rank: int, world: int, vocab_local: int):
            super().__init__()
            self.all_gather = ops.AllGather()  # concatenates along axis 0 in rank order
            self.rank, self.world, self.vocab_local = rank, world, vocab_local

        def construct(self, x):
            m = x.shape[0]
            parts = self.all_gather(x)  # [N*M, V/N], rank-major
            return parts.reshape(self.world, m, self.vocab_local).transpose(1, 0, 2).reshape(m, -1)

        def bprop(self, x, out, dout):
            lo = self.rank * self.vocab_local
            return (dout[:, lo:lo + self.vocab_local],)

    class RowParallelLinear(nn.Cell):
        """y = g(x_r @ W_r^T): serving's RowParallelLinear (same `weight` [out, in/N]) with g's backward."""

        def __init__(self, in_local: int, out_features: int):
            super().__init__()
            self.weight = Parameter(initializer("zeros", (out_features, in_local), ms.float32), name="weight")
            self.matmul = ops.MatMul(transpose_b=True)
            self.reduce = ReduceFromRanks()
            self.out_features = out_features

        def construct(self, x):
            lead = x.shape[:-1]
            y = self.matmul(x.reshape(-1, x.shape[-1]), self.weight)  # [M, out], this rank's partial sum
            return self.reduce(y).reshape(lead + (self.out_features,))

    class VocabParallelHead(nn.Cell):
        """[..., dim] -> [..., V]: this rank's vocabulary rows W_r [V/N, dim], gathered. Its input must have
        passed f (the training forward does that)."""

        def __init__(self, dim: int, vocab_local: int, rank: int, world: int):
            super().__init__()
            self.weight = Parameter(initializer("zeros", (vocab_local, dim), ms.float32), name="weight")
            self.matmul = ops.MatMul(transpose_b=True)
            self.gather = GatherVocab(rank, world, vocab_local)

        def construct(self, x):
            lead = x.shape[:-1]
            logits = self.gather(self.matmul(x.reshape(-1, x.shape[-1]), self.weight))  # [M, V]
            return logits.reshape(lead + (-1,))

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

    return CopyToRanks, RowParallelLinear, VocabParallelHead, GatherShards


def shard_for_training(model, rank: int, world: int):
    """Turn a plain Transformer into rank `rank`'s training shard, in place, before any weights are loaded
    (serving's `shard_transformer`, then the row-parallel projections and the head replaced as above).
    Returns the f Cell for the training forward's `replicated_input`."""
    from codefill.inference_workers.tp import shard_transformer

    cfg = model.config
    shard_transformer(model, rank, world)
    copy, row_parallel, vocab_head, _ = _cells()
    for layer in model.layers:
        layer.attention.wo = row_parallel(cfg.n_heads // world * cfg.head_dim, cfg.dim)
        layer.feed_forward.w2 = row_parallel(cfg.ffn_dim // world, cfg.dim)
    model.output = vocab_head(cfg.dim, cfg.vocab_size // world, rank, world)
    for name, p in model.parameters_and_names():  # full paths again, as shard_transformer does
        p.name = name
    return copy()


def _split_name(name: str) -> str:
    """The weight a tensor of a checkpoint belongs to: `adam_m.layers.0.attention.wq.weight` -> the weight."""
    for prefix in OPTIMIZER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def shard_state(tensors: Mapping[str, np.ndarray], rank: int, world: int) -> dict[str, np.ndarray]:
    """Rank `rank`'s slice of full checkpoint tensors (weights, adam_m.*, adam_v.*; adam_step and other
    replicated tensors whole), cut as `tp.split_axis` says for the weight each belongs to."""
    from codefill.inference_workers.tp import split_axis

    out = {}
    for name, full in tensors.items():
        axis = split_axis(_split_name(name))
        if axis is None:
            out[name] = full
            continue
        if full.shape[axis] % world:
            raise TrainError(f"checkpoint tensor {name} of shape {full.shape} does not split into {world} "
                             f"along axis {axis}")
        n = full.shape[axis] // world
        index = [slice(None)] * full.ndim
        index[axis] = slice(rank * n, (rank + 1) * n)
        out[name] = np.ascontiguousarray(full[tuple(index)])
    return out


def is_sharded(name: str) -> bool:
    from codefill.inference_workers.tp import split_axis

    return split_axis(_split_name(name)) is not None


class ShardGatherer:
    """Full tensors from every rank's shards: `gather()` is collective (every rank calls it at the same point)
    and returns {name: full float32 array} on every rank. Replicated tensors are taken from this rank, after
    checking that every rank holds the same ones (a sum and a sum of squares each, compared bit for bit): they
    get identical updates by construction, and a checkpoint must not hide it if they ever do not."""

    def __init__(self, params: Mapping[str, object], world: int):  # MindSpore Parameters by name
        from codefill.inference_workers.tp import split_axis

        *_, gather_shards = _cells()
        self.world = world
        self.names = [n for n in params if is_sharded(n)]
        self.replicated = [n for n in params if not is_sharded(n)]
        self.params = params
        self.axes = {n: split_axis(_split_name(n)) for n in self.names}
        self.cell = gather_shards([params[n] for n in self.names], [params[n] for n in self.replicated])

    def gather(self) -> dict[str, np.ndarray]:
        from mindspore import Tensor

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
