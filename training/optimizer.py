"""One optimiser step as two compiled graphs over the trained parameters: accumulate, then apply.

    accumulate(tokens, labels, seed) -> loss_sum       grads of the summed token loss are added to fp32 buffers
    apply(n_tokens, lr, loss_sum)    -> (global loss sum, grad norm)
        grads = buffers (all-reduced over data-parallel ranks) / n_tokens   n_tokens: the global batch's count
        clip to clip_norm by the global L2 norm, AdamW (decoupled weight decay, bias-corrected), zero buffers

Under tensor parallelism (tp_train.py) the parameters named in `sharded` are this rank's slices and their
gradients are those of the slices; the others are replicated with whole, identical gradients on every rank.
Nothing is all-reduced but the squared norm: sharded squares summed over the ranks, replicated ones once, so
every rank clips by the same true global norm. Each rank's AdamW state is that of its own slices.

All optimiser state is float32 Parameters named `adam_m.<param>`, `adam_v.<param>` plus `adam_step`, so a
checkpoint holds it by name and a resumed run continues bit for bit. Weight decay skips 1-D tensors (RMSNorm
gains) and LoRA's B, as is usual.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def _cells():
    import mindspore as ms
    from mindspore import Parameter, Tensor, nn, ops

    class Accumulate(nn.Cell):
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

    return Accumulate, Apply


class Optimizer:
    """AdamW over `params` (MindSpore Parameters, trained in float32) with gradient accumulation buffers.
    `world`: data-parallel ranks; `sharded`: names of tensor-parallel slices (see the module docstring)."""

    def __init__(self, loss_net, params: dict, cfg, world: int = 1, sharded: frozenset[str] = frozenset()):
        import mindspore as ms
        from mindspore import Parameter, Tensor

        Accumulate, Apply = _cells()
        self.names = list(params)
        plist = [params[n] for n in self.names]
        zeros = lambda n, prefix: Parameter(Tensor(np.zeros(params[n].shape, np.float32)), name=f"{prefix}.{n}",
                                            requires_grad=False)
        self.buffers = [zeros(n, "grad_acc") for n in self.names]
        self.m = [zeros(n, "adam_m") for n in self.names]
        self.v = [zeros(n, "adam_v") for n in self.names]
        self.step = Parameter(Tensor(np.zeros((), np.float32)), name="adam_step", requires_grad=False)
        decay = [len(p.shape) > 1 and not n.endswith(".lora_b") for n, p in zip(self.names, plist)]
        self.accumulate = Accumulate(loss_net, plist, self.buffers)
        self.apply = Apply(plist, self.buffers, self.m, self.v, self.step, decay, [n in sharded for n in self.names],
                           cfg, world)
        self.params = params
        self._f32 = ms.float32

    def state(self) -> dict[str, np.ndarray]:
        """Optimiser state by name (float32 numpy): adam_m.<name>, adam_v.<name>, adam_step."""
        out = {"adam_step": self.step.asnumpy().astype(np.float32).reshape(1)}
        for n, m, v in zip(self.names, self.m, self.v):
            out[f"adam_m.{n}"] = m.asnumpy()
            out[f"adam_v.{n}"] = v.asnumpy()
        return out

    def moments(self) -> dict:
        """The AdamW moment Parameters by state name (adam_m.<name>, adam_v.<name>)."""
        return {p.name: p for p in self.m + self.v}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        from mindspore import Tensor

        from .train_error import TrainError

        expected = {"adam_step"} | {f"adam_{k}.{n}" for n in self.names for k in "mv"}
        if set(state) != expected:
            raise TrainError(f"optimiser state does not match the trained parameters: missing "
                             f"{sorted(expected - set(state))[:4]}, unexpected {sorted(set(state) - expected)[:4]}")
        self.step.set_data(Tensor(np.asarray(state["adam_step"], np.float32).reshape(())))
        for n, m, v in zip(self.names, self.m, self.v):
            m.set_data(Tensor(np.ascontiguousarray(state[f"adam_m.{n}"], np.float32)))
            v.set_data(Tensor(np.ascontiguousarray(state[f"adam_v.{n}"], np.float32)))
