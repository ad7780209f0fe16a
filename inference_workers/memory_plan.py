"""The memory plan of one serving rank: what its weights, KV cache and working space take, checked against
the memory of its device before anything is loaded, with the cache size chosen from it when not given (as
vLLM's gpu_memory_utilization does).

Per rank, in bytes (b = bytes per element of the serving dtype: 4 for fp32 on CPU; on an accelerator the plan
assumes bf16, 2, the precision the accelerators are to serve in (issue 19's precision policy); until that
policy lands the runner holds fp32 weights on every device, so a plan for an accelerator is optimistic):

    weights = b x (elements of this rank's shard: sharding.shard_shapes(config, tp))
    cache   = max_batch x (max_seq_len + 1) x n_layers x (n_kv_heads / tp) x head_dim x 2 (K and V) x b
              (+1: the scratch column idle slots write to, runner.idle_position)
    work    = fixed + activations, an estimate, not a measurement:
      fixed       = 0.5 GiB on CPU (MindSpore's runtime, Python, the tokenizer table), 2 GiB on an accelerator
                    (graph compilation, the collective library's buffers, the runtime's workspace)
      activations = b x C x (4 x dim + (H + 2 x KVH) x head_dim + 3 x ffn_dim / tp)   one prefill chunk's
                    hidden states, q/k/v and SwiGLU tensors, C = min(PREFILL_CHUNK, max_seq_len)
                  + 4 x 2 x H x C x (max_seq_len + 1)      its fp32 attention scores and probabilities
                  + 4 x 2 x max_batch x (vocab_size + H x (max_seq_len + 1))   a decode step's fp32 logits
                    (this rank's and the gathered ones) and scores
      with H = n_heads / tp, KVH = n_kv_heads / tp.

Available memory (`available_memory`), times `fraction` (default 0.9, the rest left for what the estimate
misses):
- cpu: MemAvailable of /proc/meminfo, divided by the ranks on this host (they share its RAM);
- ascend: `npu-smi info -t usages -i ID` (HBM Capacity(MB)); gpu: `nvidia-smi --query-gpu=memory.total`;
- an override for either: `--device-memory GiB` or CODEFILL_DEVICE_MEMORY (GiB per device).
The accelerator queries have not run on real hardware; the override is what the tests exercise.

Choosing sizes (`plan`): a given --max-seq-len / --max-batch is only checked. One not given is chosen: at
most the current defaults (runner.default_max_seq_len: 2048 or the model's trained context if fewer;
SERVING_SLOTS slots for a server, 1 for the one-shot commands): the most slots that fit at that context,
else one slot with the longest context (a multiple of 256) that fits. Nothing fits: MemoryPlanError naming
every number.

Tensor-parallel ranks must agree on the sizes, so the launcher plans once before msrun starts and passes the
chosen sizes to every rank, which then only checks them.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from codefill.errors import CodefillError
from codefill.model.config import LlamaConfig
from codefill.model.device import local_device_id, parse_device

from .sharding import check_model_dir_for_tp, shard_shapes

GIB = 1 << 30
MEMORY_ENV = "CODEFILL_DEVICE_MEMORY"
DEFAULT_FRACTION = 0.9
FIXED_WORK_BYTES = {"cpu": GIB // 2, "ascend": 2 * GIB, "gpu": 2 * GIB}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SEQ_STEP = 256  # a chosen max_seq_len is a multiple of this
DEFAULT_SERVING_DTYPE = {"cpu": "float32", "ascend": "bfloat16", "gpu": "bfloat16"}  # model/precision.py's defaults


class MemoryPlanError(CodefillError):
    """A model and cache that do not fit the device's memory, or memory that cannot be measured; the message
    names the numbers."""


@dataclass(frozen=True)
class MemoryConfig:
    """How the plan measures and uses memory. device_memory_gib: memory per device, overriding the query
    (required where the query is not available); fraction: the share of it the plan may use."""
    device_memory_gib: float | None = None
    fraction: float = DEFAULT_FRACTION

    def __post_init__(self) -> None:
        if self.device_memory_gib is not None and not self.device_memory_gib > 0:
            raise MemoryPlanError(f"--device-memory must be a positive number of GiB, got {self.device_memory_gib}")
        if not 0 < self.fraction <= 1:
            raise MemoryPlanError(f"--memory-fraction must be in (0, 1], got {self.fraction}")

    @classmethod
    def from_flags(cls, device_memory_gib: float | None, fraction: float | None) -> "MemoryConfig":
        """The flags, else CODEFILL_DEVICE_MEMORY for the memory, else the defaults."""
        if device_memory_gib is None and os.environ.get(MEMORY_ENV):
            text = os.environ[MEMORY_ENV]
            try:
                device_memory_gib = float(text)
            except ValueError:
                raise MemoryPlanError(f"${MEMORY_ENV} must be a number of GiB, got {text!r}") from None
        return cls(device_memory_gib, DEFAULT_FRACTION if fraction is None else fraction)


@dataclass(frozen=True)
class Available:
    bytes: int
    source: str  # where the number came from, for messages


@dataclass(frozen=True)
class MemoryPlan:
    """One rank's sizes and what they take (bytes)."""
    max_seq_len: int
    max_batch: int
    weights: int
    cache: int
    work: int
    usable: int  # available x fraction
    available: Available

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.work

    def describe(self) -> str:
        return (f"weights {_gib(self.weights)} + KV cache {_gib(self.cache)} (max_batch {self.max_batch} x "
                f"max_seq_len {self.max_seq_len}) + working space {_gib(self.work)} = {_gib(self.total)} of "
                f"{_gib(self.usable)} usable ({self.available.source})")


# --- the arithmetic -------------------------------------------------------------------------------------


def weight_bytes(config: LlamaConfig, tp: int, dtype_bytes: int) -> int:
    """This rank's shard: replicated tensors whole, cut ones divided by tp."""
    return dtype_bytes * sum(math.prod(shape) for shape in shard_shapes(config, tp).values())


def cache_bytes(config: LlamaConfig, tp: int, dtype_bytes: int, max_batch: int, max_seq_len: int) -> int:
    return max_batch * (max_seq_len + 1) * config.n_layers * (config.n_kv_heads // tp) * config.head_dim * 2 \
        * dtype_bytes


def work_bytes(config: LlamaConfig, tp: int, dtype_bytes: int, max_batch: int, max_seq_len: int,
               device: str) -> int:
    """The working-space estimate of the module docstring."""
    from .coordination import PREFILL_CHUNK  # here: coordination imports MindSpore, and launchers import this

    heads, kv_heads, keys = config.n_heads // tp, config.n_kv_heads // tp, max_seq_len + 1
    chunk = min(PREFILL_CHUNK, max_seq_len)
    chunk_acts = dtype_bytes * chunk * (4 * config.dim + (heads + 2 * kv_heads) * config.head_dim
                                        + 3 * config.ffn_dim // tp)
    chunk_scores = 4 * 2 * heads * chunk * keys
    decode = 4 * 2 * max_batch * (config.vocab_size + heads * keys)
    return FIXED_WORK_BYTES[parse_device(device)] + chunk_acts + chunk_scores + decode


def sizes(config: LlamaConfig, tp: int, dtype_bytes: int, max_batch: int, max_seq_len: int,
          device: str) -> tuple[int, int, int]:
    """(weights, cache, work) bytes of one rank."""
    return (weight_bytes(config, tp, dtype_bytes), cache_bytes(config, tp, dtype_bytes, max_batch, max_seq_len),
            work_bytes(config, tp, dtype_bytes, max_batch, max_seq_len, device))


# --- choosing and checking ------------------------------------------------------------------------------


def plan(config: LlamaConfig, tp: int, device: str, available: Available, *, dtype: str | None = None,
         max_seq_len: int | None = None, max_batch: int | None = None, fraction: float = DEFAULT_FRACTION,
         default_max_seq_len: int, default_max_batch: int) -> MemoryPlan:
    """The sizes of one rank (see the module docstring), or MemoryPlanError naming the numbers."""
    device = parse_device(device)
    if dtype is None:  # the precision policy's (model/precision.py): --precision, else the device's default
        from codefill.model.precision import PLAN_DTYPES, resolve

        dtype = PLAN_DTYPES[resolve(None, device)]
    if dtype not in DTYPE_BYTES:
        raise MemoryPlanError(f"serving dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    b = DTYPE_BYTES[dtype]
    usable = int(available.bytes * fraction)

    def make(seq: int, batch: int) -> MemoryPlan:
        return MemoryPlan(seq, batch, *sizes(config, tp, b, batch, seq, device), usable, available)

    seq_cap = max_seq_len if max_seq_len is not None else default_max_seq_len
    batch_cap = max_batch if max_batch is not None else default_max_batch
    best = make(seq_cap, batch_cap)
    if best.total <= usable:
        return best
    if max_batch is None:  # fewer slots at the full context
        for batch in range(batch_cap - 1, 0, -1):
            if (p := make(seq_cap, batch)).total <= usable:
                return p
    if max_seq_len is None:  # then a shorter context in one slot (or in the given slots)
        batch = max_batch if max_batch is not None else 1
        for seq in range((seq_cap - 1) // SEQ_STEP * SEQ_STEP, 0, -SEQ_STEP):
            if (p := make(seq, batch)).total <= usable:
                return p
    raise MemoryPlanError(_refusal(best, config, tp, device, dtype, fraction, max_seq_len, max_batch))


def _refusal(p: MemoryPlan, config: LlamaConfig, tp: int, device: str, dtype: str, fraction: float,
             max_seq_len: int | None, max_batch: int | None) -> str:
    chosen = [f for f, v in (("--max-seq-len", max_seq_len), ("--max-batch", max_batch)) if v is None]
    tried = f" (even the smallest {' and '.join(chosen)})" if chosen else ""
    fixed = p.weights + p.work
    if fixed > p.usable:
        advice = (f"the weights and working space alone need {_gib(fixed)}: use a larger --tp than {tp}, or more "
                  f"device memory")
    else:
        advice = f"use a smaller --max-seq-len / --max-batch, or a larger --tp than {tp}"
    return (f"the model does not fit on {device} (rank shard of tp {tp}, {dtype}, dim {config.dim}, "
            f"{config.n_layers} layers){tried}: weights {_gib(p.weights)} + KV cache {_gib(p.cache)} "
            f"(max_batch {p.max_batch} x max_seq_len {p.max_seq_len}) + working space {_gib(p.work)} = "
            f"{_gib(p.total)} > available {_gib(p.usable)} ({fraction:.0%} of {p.available.source}); {advice}")


def plan_model_dir(model_dir: str | Path, tp: int, device: str, memory: MemoryConfig | None = None, *,
                   max_seq_len: int | None, max_batch: int | None, default_max_batch: int,
                   local_ranks: int = 1, dtype: str | None = None) -> MemoryPlan:
    """The plan of one rank of `model_dir` at `tp`, read from its config alone: before any weight is loaded.
    dtype: the serving dtype (the runner passes its precision's; None: the device's default)."""
    from .runner import default_max_seq_len

    memory = memory or MemoryConfig()
    config = check_model_dir_for_tp(model_dir, tp)
    available = available_memory(device, memory, local_ranks=local_ranks)
    return plan(config, tp, device, available, dtype=dtype, max_seq_len=max_seq_len, max_batch=max_batch,
                fraction=memory.fraction, default_max_seq_len=default_max_seq_len(config),
                default_max_batch=default_max_batch)


# --- measuring ------------------------------------------------------------------------------------------


def available_memory(device: str, memory: MemoryConfig | None = None, *, local_ranks: int = 1,
                     meminfo: str | Path = "/proc/meminfo") -> Available:
    """Memory one rank may plan with (see the module docstring); MemoryPlanError if it cannot be measured."""
    device = parse_device(device)
    memory = memory or MemoryConfig()
    if memory.device_memory_gib is not None:
        return Available(int(memory.device_memory_gib * GIB), f"{_gib(memory.device_memory_gib * GIB)} given "
                                                              f"by --device-memory")
    if device == "cpu":
        total = _meminfo_available(Path(meminfo))
        share = f" / {local_ranks} ranks on this host" if local_ranks > 1 else ""
        return Available(total // max(1, local_ranks), f"{_gib(total)} MemAvailable{share}")
    device_id = local_device_id()
    mib = _query_device_mib(device, device_id)
    return Available(mib << 20, f"{_gib(mib << 20)} of {device} device {device_id}")


def _meminfo_available(path: Path) -> int:
    try:
        text = path.read_text()
    except OSError as e:
        raise MemoryPlanError(f"cannot read {path} to measure free memory ({e}); give --device-memory GiB") from e
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M)
    if m is None:
        raise MemoryPlanError(f"{path} has no MemAvailable line; give --device-memory GiB")
    return int(m.group(1)) * 1024


_QUERIES = {  # device -> (command, the pattern of its memory in MiB)
    "ascend": (["npu-smi", "info", "-t", "usages", "-i", "{id}"], r"HBM Capacity\(MB\)\s*:\s*(\d+)"),
    "gpu": (["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "{id}"], r"^\s*(\d+)"),
}


def _query_device_mib(device: str, device_id: int) -> int:
    """An accelerator's memory in MiB from its vendor's tool (not run on real hardware here)."""
    command, pattern = _QUERIES[device]
    command = [c.format(id=device_id) for c in command]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise MemoryPlanError(f"cannot measure the memory of {device} device {device_id} with `{' '.join(command)}` "
                              f"({e}); give --device-memory GiB (memory per device)") from e
    m = re.search(pattern, out, re.M)
    if m is None:
        raise MemoryPlanError(f"`{' '.join(command)}` printed no memory size; give --device-memory GiB")
    return int(m.group(1))


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"
