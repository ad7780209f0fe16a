"""The Cells a tensor-parallel shard is made of (sharding.shard_transformer puts them in), with the backward
that training needs, so one shard serves and trains.

MindSpore's built-in bprops of the collectives (ops/_grad_experimental/grad_comm_ops.py) are

    AllReduce(SUM)  bprop: dx = AllReduce(SUM)(dout)
    AllGather       bprop: dx = ReduceScatter(SUM)(dout)

Every rank computes the same loss from the same replicated activations, so dout is the same on every rank and
both would give N times the true gradient. Megatron's two conjugate operators are what training needs:

    f  CopyToRanks      forward identity, backward AllReduce(SUM)   after each norm whose output feeds
                                                                     column-parallel matmuls: each rank's input
                                                                     gradient is only its heads' / columns' share
    g  ReduceFromRanks  forward AllReduce(SUM), backward identity   on the partial sums of a row-parallel matmul
    GatherVocab         forward AllGather of the [M, V/N] logits into [M, V]; backward: this rank's [M, V/N]
                        slice of dout (not ReduceScatter: dout is already whole on every rank)

They are parameter-free Cells with a custom `bprop` (honoured in graph mode; a forward-only graph just runs
the forward). f sits once per normed hidden state (`RankInputNorm`): wq, wk, wv share one, w1 and w3 another,
the head a third, so a layer all-reduces [B, T, dim] twice forward (g after wo and w2) and twice backward
(f before attention and before the FFN), not once per column-parallel projection.

The parameter Cells keep the plain model's parameter names and layouts (`weight` [out, in]), so the shard
loads with the same names and a rank's optimiser state is keyed as at TP=1.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import Parameter, nn, ops
from mindspore.common.initializer import initializer

from codefill.model.llama import Linear, RMSNorm


class Collective(nn.Cell):
    """One collective primitive as a graph of its own (the step channel, barriers): `Collective(ops.AllGather())`."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, x):
        return self.op(x)


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
    """[M, V/N] on each rank -> [M, V] (rank r's columns at [r*V/N, (r+1)*V/N)); backward keeps this rank's
    columns of the gradient."""

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


class RankInputNorm(RMSNorm):
    """The model's RMSNorm (same `weight`), then f: its output feeds column-parallel projections."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        self.copy = CopyToRanks()

    def construct(self, x):
        return self.copy(super().construct(x))


class RowParallelLinear(Linear):
    """y = g(x_r @ W_r^T): W_r [out, in/N] this rank's input columns, x_r [..., in/N] the matching slice of
    the activations (what the column-parallel layer before it produced)."""

    def __init__(self, in_local: int, out_features: int):
        super().__init__(in_local, out_features)
        self.reduce = ReduceFromRanks()

    def construct(self, x):
        return self.reduce(super().construct(x))  # this rank's partial sums, summed over the ranks


class VocabParallelHead(nn.Cell):
    """[..., dim] -> [..., V]: this rank's vocabulary rows W_r [V/N, dim], gathered over the ranks."""

    def __init__(self, dim: int, vocab_local: int, rank: int, world: int):
        super().__init__()
        self.weight = Parameter(initializer("zeros", (vocab_local, dim), ms.float32), name="weight")
        self.matmul = ops.MatMul(transpose_b=True)
        self.gather = GatherVocab(rank, world, vocab_local)

    def construct(self, x):
        lead = x.shape[:-1]
        logits = self.gather(self.matmul(x.reshape(-1, x.shape[-1]), self.weight))  # [M, V]
        return logits.reshape(lead + (-1,))
