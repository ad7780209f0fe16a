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

The graphs are the Cells of optimizer_graphs.py, which imports MindSpore; this module does not until an
Optimizer is made, so importing it stays light.
"""

from __future__ import annotations

import numpy as np


class Optimizer:
    """AdamW over `params` (MindSpore Parameters, trained in float32) with gradient accumulation buffers.
    `world`: data-parallel ranks; `sharded`: names of tensor-parallel slices (see the module docstring)."""

    def __init__(self, loss_net, params: dict, cfg, world: int = 1, sharded: frozenset[str] = frozenset()):
        import mindspore as ms
        from mindspore import Parameter, Tensor

        from .optimizer_graphs import Accumulate, Apply

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
