"""The optimiser's two compiled graphs, `Accumulate` and `Apply` (the math of optimizer.py's docstring).

This module imports MindSpore; optimizer.py, which builds them, imports it only when an Optimizer is made.
"""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops


class Accumulate(nn.Cell):
    """accumulate(tokens, labels, seed) -> loss_sum; the gradients of the loss sum are added to `buffers`."""

    def __init__(self, loss_net, params, buffers):
        super().__init__(auto_prefix=False)
        self.loss_net = loss_net
        self.params = ms.ParameterTuple(params)
        self.buffers = ms.ParameterTuple(buffers)
        self.grad = ops.GradOperation(get_by_list=True)

    def construct(self, tokens, labels, seed):
        loss = self.loss_net(tokens, labels, seed)
        grads = self.grad(self.loss_net, self.params)(tokens, labels, seed)
        for buf, g in zip(self.buffers, grads):
            ops.assign_add(buf, g)
        return loss


class Apply(nn.Cell):
    """apply(n_tokens, lr, loss_sum) -> (global loss sum, grad norm): all-reduce, clip, AdamW, zero buffers."""

    def __init__(self, params, buffers, m, v, step, decay_mask, sharded_mask, cfg, world: int):
        super().__init__(auto_prefix=False)
        self.params, self.buffers = ms.ParameterTuple(params), ms.ParameterTuple(buffers)
        self.m, self.v = ms.ParameterTuple(m), ms.ParameterTuple(v)
        self.step = step
        self.decay = tuple(float(cfg.weight_decay) if d else 0.0 for d in decay_mask)
        self.sharded = tuple(bool(s) for s in sharded_mask)
        self.tensor_parallel = any(self.sharded)
        self.beta1, self.beta2, self.eps, self.clip = cfg.beta1, cfg.beta2, cfg.eps, float(cfg.clip_norm)
        self.world = world  # data-parallel ranks
        self.all_reduce = ops.AllReduce() if world > 1 or self.tensor_parallel else None

    def construct(self, n_tokens, lr, loss_sum):
        if self.world > 1:
            loss_sum = self.all_reduce(loss_sum)
        grads = []
        sq = ops.zeros((), ms.float32)
        sq_sharded = ops.zeros((), ms.float32)
        for buf, sharded in zip(self.buffers, self.sharded):
            g = buf
            if self.world > 1:
                g = self.all_reduce(g)
            g = g / n_tokens
            grads.append(g)
            if sharded:
                sq_sharded = sq_sharded + (g * g).sum()
            else:
                sq = sq + (g * g).sum()
        if self.tensor_parallel:
            sq = sq + self.all_reduce(sq_sharded)
        norm = ops.sqrt(sq)
        factor = ops.ones((), ms.float32)
        if self.clip > 0:
            factor = ops.minimum(factor, self.clip / (norm + 1e-6))
        step = self.step + 1.0
        ops.assign(self.step, step)
        c1 = 1.0 - ops.pow(self.beta1, step)
        c2 = 1.0 - ops.pow(self.beta2, step)
        for p, g, m_old, v_old, buf, decay in zip(self.params, grads, self.m, self.v, self.buffers, self.decay):
            g = g * factor
            m = self.beta1 * m_old + (1.0 - self.beta1) * g
            v = self.beta2 * v_old + (1.0 - self.beta2) * g * g
            ops.assign(m_old, m)
            ops.assign(v_old, v)
            update = (m / c1) / (ops.sqrt(v / c2) + self.eps) + decay * p
            ops.assign(p, p - lr * update)
            ops.assign(buf, ops.zeros_like(buf))
        return loss_sum, norm
