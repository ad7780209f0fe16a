"""LoRA adapters around the plain model's Linear Cells, and merging them into the base weights.

    y = x @ W^T + (alpha / r) * dropout(x) @ A^T @ B^T        W [out, in] frozen, A [r, in], B [out, r]

B starts at zero, so an untrained adapter is the base model exactly. Merged: W' = W + (alpha / r) * B @ A.
Adapter tensors are named after the weight they adapt: `layers.0.attention.wq.lora_a` / `.lora_b`.

`apply_lora` is a transform of the one model (`llama.Transformer`, see also `sharding.shard_transformer`): it
swaps each targeted projection's `Linear` for a `LoraLinear` that keeps the same `weight` Parameter (frozen)
and adds the adapter's two, so parameter names and the model's forward are unchanged.

Dropout must replay exactly on resume, so it does not use MindSpore's stateful random ops: its mask is a
hash of (element index, a per-step seed, a per-adapter constant), computed in the graph from a seed Parameter
shared by every adapter, which the loss Cell sets from its seed input (train_network.py). Same step, same
mask, whether or not the run was interrupted.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, ops

from codefill.model.llama import Linear

from .train_config import LoraConfig
from .train_error import TrainError

PROJECTION_PATHS = {"wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
          "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3"}


def adapter_names(n_layers: int, cfg: LoraConfig) -> list[str]:
    """`layers.{i}.{path}` of every adapted projection, in a fixed order."""
    return [f"layers.{i}.{PROJECTION_PATHS[t]}" for i in range(n_layers) for t in cfg.targets]


def init_adapters(model_shapes: Mapping[str, tuple[int, ...]], n_layers: int, cfg: LoraConfig,
                  seed: int) -> dict[str, np.ndarray]:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform as in the LoRA paper's code), B = 0."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in adapter_names(n_layers, cfg):
        n_out, n_in = model_shapes[name + ".weight"]
        bound = 1.0 / np.sqrt(n_in)
        out[name + ".lora_a"] = rng.uniform(-bound, bound, (cfg.rank, n_in)).astype(np.float32)
        out[name + ".lora_b"] = np.zeros((n_out, cfg.rank), np.float32)
    return out


def merge_adapters(weights: Mapping[str, np.ndarray], adapters: Mapping[str, np.ndarray], n_layers: int,
                   cfg: LoraConfig) -> dict[str, np.ndarray]:
    """Base weights with every adapter folded in (float32, computed in float64); the rest unchanged."""
    merged = dict(weights)
    for name in adapter_names(n_layers, cfg):
        try:
            a, b = adapters[name + ".lora_a"], adapters[name + ".lora_b"]
        except KeyError as e:
            raise TrainError(f"adapters lack {e.args[0]} (have {sorted(adapters)[:4]}...)") from None
        w = weights[name + ".weight"]
        if (b.shape[0], a.shape[1]) != tuple(w.shape) or a.shape[0] != cfg.rank or b.shape[1] != cfg.rank:
            raise TrainError(f"adapter {name}: A {a.shape}, B {b.shape} do not fit weight {w.shape} at rank {cfg.rank}")
        delta = cfg.scale * (b.astype(np.float64) @ a.astype(np.float64))
        merged[name + ".weight"] = (w.astype(np.float64) + delta).astype(np.float32)
    return merged


class LoraLinear(Linear):
    """W x + scale * B(A(dropout(x))), W the base Linear's own `weight` Parameter (shared, not copied)."""

    def __init__(self, base: Linear, a: np.ndarray, b: np.ndarray, scale: float, dropout: float, salt: int,
                 seed: Parameter):
        super().__init__(a.shape[1], base.out_features, base.bias is not None)
        self.weight, self.bias = base.weight, base.bias  # a bias (Qwen2's q/k/v) is the base's, no adapter
        self.lora_a = Parameter(Tensor(a), name="lora_a")
        self.lora_b = Parameter(Tensor(b), name="lora_b")
        self.seed = seed  # float32 scalar, shared by every adapter: 0 at evaluation (no dropout)
        self.scale = scale
        self.keep = 1.0 - dropout
        self.use_dropout = dropout > 0
        self.salt = float(salt % 9973) * 0.6180339887

    def construct(self, x):
        lead = x.shape[:-1]
        h = x.reshape(-1, x.shape[-1])  # [N, in]
        y = self.matmul(h, self.weight)  # [N, out]
        if self.bias is not None:
            y = y + self.bias
        if self.use_dropout:
            n, d = h.shape[0], h.shape[1]
            idx = ops.arange(0, n * d, dtype=ms.float32).reshape(n, d)
            # A cheap hash in float32: frac(sin(i * c + seed + salt) * 43758.5453), uniform enough for
            # dropout and identical on every replay of the same (step, micro-batch).
            u = ops.sin(idx * 12.9898 + self.seed * 78.233 + self.salt) * 43758.5453
            u = u - ops.floor(u)
            keep = (u < self.keep).astype(ms.float32)
            train = (self.seed != 0).astype(ms.float32)
            h = h * (train * keep / self.keep + (1.0 - train))
        delta = self.matmul(self.matmul(h, self.lora_a), self.lora_b)  # [N, r] -> [N, out]
        return (y + self.scale * delta).reshape(lead + (self.out_features,))


def apply_lora(model, cfg: LoraConfig, adapters: Mapping[str, np.ndarray]) -> tuple[dict[str, Parameter], Parameter]:
    """Wrap `model`'s targeted projections with adapters, in place. Returns ({adapter tensor name:
    Parameter}, the shared dropout seed Parameter for train_network.LanguageModelLoss)."""
    seed = Parameter(Tensor(0.0, ms.float32), name="lora_seed", requires_grad=False)
    for i, layer in enumerate(model.layers):
        for key in cfg.targets:
            owner_path, attr = PROJECTION_PATHS[key].split(".")
            owner = getattr(layer, owner_path)
            name = f"layers.{i}.{PROJECTION_PATHS[key]}"
            try:
                a, b = adapters[name + ".lora_a"], adapters[name + ".lora_b"]
            except KeyError as e:
                raise TrainError(f"adapters lack {e.args[0]} (have {sorted(adapters)[:4]}...)") from None
            salt = i * 7 + list(PROJECTION_PATHS).index(key) + 1
            setattr(owner, attr, LoraLinear(getattr(owner, attr), a, b, cfg.scale, cfg.dropout, salt, seed))
    trained = {}
    for name, p in model.parameters_and_names():  # full paths again, as sharding does after a transform
        if name.endswith((".lora_a", ".lora_b")):
            p.name = name
            trained[name] = p
    return trained, seed
