"""The precision policy: in which floating-point type a model's weights, activations and KV cache live.

| policy | weights, activations, KV cache | norms, softmax statistics | logits and sampling |
| --- | --- | --- | --- |
| `fp32` (CPU's default) | float32 | float32 | float32 |
| `bf16` (accelerators' default) | bfloat16 | float32 inside the norm | float32 |
| `fp16` | float16 | float32 inside the norm | float32 |

Half precision halves the bytes every decode step reads (Code Llama 34B is 136 GB in float32, 68 GB in
bfloat16: it fits 4 or 8 accelerator cards only in half precision). A checkpoint's stored dtype does not
matter: `load_weights` converts every tensor to the model's type at load (float32 stays exact; half
precision rounds once). MindSpore has no bfloat16 MatMul on CPU, so on CPU only `fp32` and `fp16` run.

`apply_precision(model, name)` is a transform of a built model (after sharding, before loading weights):
it changes the type of its weights and caches; the model's forward keeps norms and logits in float32.
"""

from __future__ import annotations

import os

import mindspore as ms

from codefill.errors import CodefillError

DTYPES = {"fp32": ms.float32, "bf16": ms.bfloat16, "fp16": ms.float16}
PLAN_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # memory_plan's names
DEVICE_DEFAULTS = {"cpu": "fp32", "ascend": "bf16", "gpu": "bf16"}
PRECISION_ENV = "CODEFILL_PRECISION"
CPU_PRECISIONS = ("fp32", "fp16")  # MindSpore's CPU kernels: no bfloat16 MatMul


class PrecisionError(CodefillError, ValueError):
    """A precision that is unknown or does not run on the device; the message names both."""


def resolve(name: str | None, device: str = "cpu") -> str:
    """The policy to use: `name`, else $CODEFILL_PRECISION (which `--precision` sets for every process a
    command starts), else the device's default; refused when unknown or not runnable there."""
    if device not in DEVICE_DEFAULTS:
        raise PrecisionError(f"unknown device {device!r}: choose one of {sorted(DEVICE_DEFAULTS)}")
    name = name or os.environ.get(PRECISION_ENV) or DEVICE_DEFAULTS[device]
    if name not in DTYPES:
        raise PrecisionError(f"unknown precision {name!r}: choose one of {sorted(DTYPES)}")
    if device == "cpu" and name not in CPU_PRECISIONS:
        raise PrecisionError(f"precision {name} does not run on cpu (MindSpore has no CPU bfloat16 MatMul): "
                             f"choose one of {list(CPU_PRECISIONS)}")
    return name


def apply_precision(model, name: str) -> None:
    """Store the model's weights, KV cache and rotary tables in `name`'s type (see the module docstring)."""
    from mindspore import Parameter, Tensor

    from .llama import weight_parameters

    if name not in DTYPES:
        raise PrecisionError(f"unknown precision {name!r}: choose one of {sorted(DTYPES)}")
    dtype = model.dtype = DTYPES[name]
    if dtype == ms.float32:
        return
    for p in weight_parameters(model).values():
        p.set_dtype(dtype)
    for layer in model.layers:
        attn = layer.attention
        for cache in ("cache_k", "cache_v"):
            old = getattr(attn, cache)
            setattr(attn, cache, Parameter(Tensor(old.asnumpy(), dtype), name=old.name, requires_grad=False))
    model.rope_cos, model.rope_sin = model.rope_cos.astype(dtype), model.rope_sin.astype(dtype)
