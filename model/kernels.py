"""CPU kernels for the serving graphs: fewer, cheaper ops per layer than the stock MindSpore path.

On CPU a decode step is mostly op launches and broadcasting elementwise kernels, not arithmetic
(docs/benchmarks/profile.md): a layer's RMSNorm is six ops, its rotary embedding eight per projection, and its
attention reads every column of the static cache through a reshape (a copy), a masked batched matmul and a
softmax. `cpu_kernels.cc` does each of these as one function called through MindSpore's own custom-operator
interface (`ops.Custom(func_type="aot")`): RMSNorm, rotary, silu(a) * b, and attention of new queries over a
slot's cached keys that reads only the columns up to each query's position, straight from the cache rows.

`use_kernels(model)` switches a built model's cached (serving) forward onto them; the stock ops stay the
reference (training's all-position forward always uses them, and every other device does). The library is
compiled on first use with the system's C++ compiler into `$CODEFILL_CACHE/kernels/<source hash>/`; when that
is not possible, or `CODEFILL_KERNELS=reference`, the model keeps the stock ops and `load()` says why.
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

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
# -ffast-math lets exp vectorize (glibc's vector math); no kernel relies on infinities or NaNs.
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared"]


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
    return status
