"""CPU kernels for the serving graphs: fewer, cheaper ops per layer than the stock MindSpore path.

On CPU a decode step is bound by reading the weights, plus a fixed cost per op launched
(docs/benchmarks/profile.md). `cpu_kernels.cc` does a layer's work in a few functions called through
MindSpore's own custom-operator interface (`ops.Custom(func_type="aot")`):

- RMSNorm (six stock ops);
- q, k and v in one projection, the rotary embedding, and the write of the new keys and values into the cache
  rows, in place (two ScatterUpdates, two rotaries and three slices before);
- attention of the new queries over their slot's cached keys, reading only the columns up to each query's
  position, straight from the cache rows;
- every other projection (`linear`), and SwiGLU's gate and up projections with silu(a) * b in one;
- where a layer is the plain one (one process, no adapters, no biases), the whole layer's cached forward as four:
  norm, q/k/v, rotary, cache write and attention; the output projection with the residual add; norm, gate and
  up; the down projection with the residual add (38 ops a decode step of 8 layers, 392 with the stock ops).

The projections and the attention split their work over a team of threads, one per core the process may use
(a tensor-parallel rank pinned to one core has a team of one). Fused projections matter for that too: as
separate ops MindSpore ran the independent ones (q, k, v; gate, up) at once, and they fought over the cores.

`use_kernels(model)` switches a built model's cached (serving) forward onto them; the stock ops stay the
reference (training always uses them, and every other device does). The library is compiled on first use with
the system's C++ compiler into `$CODEFILL_CACHE/kernels/<source hash>/`; when that is not possible, or
`CODEFILL_KERNELS=reference`, the model keeps the stock ops and `load()` says why. `CODEFILL_KERNEL_THREADS`
caps the team; `CODEFILL_KERNEL_SPIN_US` is how long its helpers wait for the next kernel before sleeping.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
from mindspore import Tensor, nn

from codefill.cache import cache_root

from .llama import Linear, RMSNorm

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
# -ffast-math lets exp vectorize (glibc's vector math); no kernel relies on infinities or NaNs.
COMPILE_FLAGS = ["-std=c++20", "-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared"]


class Kernels:
    """The custom ops, one instance per model (ops.Custom primitives are cheap to create)."""

    def __init__(self, library: Path):
        from mindspore import ops

        def op(name: str):
            # Shapes and types from the library's NAMEInferShape / NAMEInferType (out_shape None), which
            # dynamic-shape graphs need at every call; MindSpore finds them by the reg_op_name attribute.
            custom = ops.Custom(f"{library}:{name}", out_shape=None, out_dtype=None, func_type="aot")
            custom.add_prim_attr("reg_op_name", name)
            return custom

        self.rms_norm = op("rms_norm")  # (x, weight, eps [1]) -> like x
        self.rotary = op("rotary")  # (x [B, T, heads, D], cos, sin [B, T, 1, D]) -> like x
        self.silu_mul = op("silu_mul")  # (a, b) -> like a
        self.cache_attention = op("cache_attention")  # (q, cache_k, cache_v, slots, positions, [R, S]) -> like q
        self.linear = op("linear")  # (x [..., in], weight [out, in]) -> [..., out]
        # (x [B, T, in], wq, wk, wv, cos, sin, cache_k, cache_v, cache_idx) -> q [B, T, H*D]; writes the cache
        self.qkv_cache = op("qkv_cache")
        self.qkv_cache.add_prim_attr("side_effect_mem", True)
        self.swiglu = op("swiglu")  # (x [..., in], w1, w3 [ffn, in]) -> [..., ffn]
        # A whole layer in four (TransformerBlock.fused): (x, norm weight, eps, wq, wk, wv, cos, sin, cache_k,
        # cache_v, cache_idx, slots, positions, [R, S]) -> attention output [B, T, H*D], writing the cache;
        # (x, weight, residual) -> residual + x weight^T; (x, norm weight, eps, w1, w3) -> swiglu(rms_norm(x)).
        self.attention_block = op("attention_block")
        self.attention_block.add_prim_attr("side_effect_mem", True)
        self.linear_add = op("linear_add")
        self.norm_swiglu = op("norm_swiglu")


class CacheAttention(nn.Cell):
    """The attention kernel as the model's fused attention (llama.Attention.fused_attention)."""

    def __init__(self, kernels: Kernels, n_rep: int, columns: int):
        super().__init__()
        self.kernel = kernels.cache_attention
        self.cache_shape = Tensor([n_rep, columns], ms.int32)  # [R, S]: the kernel's view of the cache rows

    def construct(self, q, cache_k, cache_v, slots, positions):
        return self.kernel(q, cache_k, cache_v, slots, positions, self.cache_shape)


@dataclass(frozen=True)
class KernelStatus:
    library: Path | None  # the compiled library, or None: the stock ops are used
    reason: str  # why not, or where it came from


def load(device_target: str = "CPU") -> KernelStatus:
    """The compiled library for this process, building it once per source version; never raises."""
    if device_target != "CPU":
        return KernelStatus(None, f"device {device_target}: the stock MindSpore ops")
    if os.environ.get("CODEFILL_KERNELS", "cpu") == "reference":
        return KernelStatus(None, "CODEFILL_KERNELS=reference")
    named = os.environ.get("CXX")
    compiler = shutil.which(named) if named else shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return KernelStatus(None, f"no C++ compiler ({named or 'g++ or c++'}) found: using the stock MindSpore ops")
    # oneDNN's GEMM comes from the libdnnl that MindSpore ships (and loads); linked by path, found by rpath.
    ms_lib = Path(ms.__file__).parent / "lib"
    dnnl = sorted(ms_lib.glob("libdnnl.so*"))
    if not dnnl:
        return KernelStatus(None, f"no libdnnl.so in {ms_lib}: using the stock MindSpore ops")
    flags = [*COMPILE_FLAGS, str(SOURCE), f"-L{ms_lib}", f"-l:{dnnl[0].name}", f"-Wl,-rpath,{ms_lib}"]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    library = cache_root() / "kernels" / key / "cpu_kernels.so"
    if library.is_file():
        return KernelStatus(library, f"cached {library}")
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:  # compile aside, then rename: atomic
        built = Path(tmp) / library.name
        run = subprocess.run([compiler, *flags, "-o", str(built)], capture_output=True, text=True)
        if run.returncode != 0:
            return KernelStatus(None, f"{compiler} could not build {SOURCE.name} (using the stock MindSpore ops): "
                                      f"{run.stderr.strip()[-500:]}")
        os.replace(built, library)
    return KernelStatus(library, f"built {library}")


def use_kernels(model, status: KernelStatus | None = None) -> KernelStatus:
    """Switch the model's cached forward onto the CPU kernels (a transform of a built model, after sharding);
    returns the status: with no library the model is left on the stock ops."""
    status = load() if status is None else status
    if status.library is None:
        return status
    kernels = Kernels(status.library)
    model.kernels = kernels
    for layer in model.layers:
        layer.attention.kernels = kernels
        layer.attention.fused_attention = CacheAttention(kernels, model.config.n_rep, model.max_seq_len + 1)
        layer.feed_forward.kernels = kernels
        layer.attention_norm.kernels = kernels
        layer.ffn_norm.kernels = kernels
    model.norm.kernels = kernels
    for _, cell in model.cells_and_names():
        if isinstance(cell, Linear):  # every projection (a subclass that overrides construct ignores it)
            cell.kernels = kernels
    # q, k, v in one kernel, and gate and up: where they are the plain projections (not LoRA adapters), q/k/v
    # without biases (Qwen2's keep the separate projections).
    for layer in model.layers:
        attn, ff = layer.attention, layer.feed_forward
        attn.fused_qkv = all(type(attn_proj) is Linear and attn_proj.bias is None
                             for attn_proj in (attn.wq, attn.wk, attn.wv))
        ff.fused = type(ff.w1) is Linear and type(ff.w3) is Linear
        # The whole layer as four kernels where it is the plain one: one process (a tensor-parallel shard's
        # norms and output projections are other Cells, its residual follows an all-reduce), no adapters.
        layer.fused = (attn.fused_qkv and ff.fused and type(attn.wo) is Linear and type(ff.w2) is Linear
                       and type(layer.attention_norm) is RMSNorm and type(layer.ffn_norm) is RMSNorm)
    return status
