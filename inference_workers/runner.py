"""The one runner: a model (the plain Transformer, or one rank's tensor-parallel shard of it) with its static
KV cache and two compiled graphs, token ids in, logits out. A single worker is the tensor-parallel path
with world size 1.

The engine (`engine.py`, on rank 0) decides which sequences prefill and decode at each step; the runner runs
that on the model. It checks every request, owns the defaults (context length, cache slots), chunks long
prefills and builds the cache indices. On rank 0 of several ranks it announces each chunk and step to the
others first (coordination.py), which run the same step on their shards through the same class
(`coordination.follow`); the collectives inside the graphs keep them in step, and the logits are identical
on every rank. The one-process commands (`generate`, `infill`, `eval`) use it with world size 1.

Compiled MindSpore graphs share one Transformer and its cache:

- prefill: one slot, T new tokens at positions start_pos .. start_pos+T-1 -> logits of the last one. T is a
  dynamic dimension (`Cell.set_inputs` with `None`), so one graph serves every prompt length; prompts longer
  than PREFILL_CHUNK are prefilled in chunks through it, which bounds the [KV, T*R, K] scores tensor;
- decode: one token for every slot at once ([max_batch, 1], each row with its own position; row i is cache
  slot i, an idle slot is given position `max_seq_len`, the scratch column) -> logits [max_batch, V]; and,
  with several slots, a second decode graph for a step with one active slot ([1, 1], reading only that
  slot's row), so a lone sequence does not pay for every slot. Their shapes are static: on CPU a graph with
  dynamic shapes costs more per step than it saves (docs/benchmarks/README.md);
- verify (speculation): the logits of every one of up to VERIFY_WIDTH new ids, static and padded at the
  scratch column (longer verifies go through a dynamic-length twin of the prefill graph).

The model is built plain, then transformed: sharded for this rank, put in the precision policy's dtype
(`model/precision.py`), and given its attention path by device (CPU kernels, Ascend's fused operators, or
the stock ops as the reference; `self.kernels` says which on CPU and why).

No graph recompiles per token or per prompt length (`compiled_graphs()` counts; the tests check it).
Why dynamic T and chunks rather than length buckets is measured in docs/benchmarks/.

Cache slots are the unit of memory: slot s holds the keys/values of one sequence, positions 0..len-1. What a
slot holds is the engine's bookkeeping; the runner only writes where it is told. Prefill onto a slot from
`start_pos` > 0 reuses the cached prefix; rolling a slot back is just prefilling from an earlier position,
since entries past a row's position are never attended to.

`reload(model_dir)` replaces the weights in place, between steps, in two phases on every rank (stage, then
commit or discard; coordination.py): everything is loaded and checked before a single parameter changes, so
a corrupt or mismatched directory raises (CheckpointError, WeightError, TensorParallelError) and the old
weights keep serving. `Parameter.set_data` keeps the compiled graphs: neither is recompiled.

Not thread-safe: call it from one thread at a time (the engine's model thread).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator, Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from codefill.cache import cache_root
from codefill.errors import CodefillError
from codefill.model import llama
from codefill.model.checkpoint import CheckpointError
from codefill.model.config import LlamaConfig
from codefill.model.device import TARGETS, configure_mindspore
from codefill.model.ascend_attention import use_ascend_attention
from codefill.model.kernels import KernelStatus, load as load_kernels, use_kernels
from codefill.model.precision import PLAN_DTYPES, apply_precision, resolve as resolve_precision
from codefill.model.sampling import SamplingConfig, log_softmax, sample, without

from .coordination import (
    OP_COMMIT,
    OP_DECODE,
    OP_DISCARD,
    OP_PREFILL,
    OP_STAGE,
    OP_VERIFY,
    OP_STOP,
    PREFILL_CHUNK,
    LocalChannel,
    encode_path,
    reload_failures,
    reload_status,
)
from .memory_plan import MemoryConfig, plan_model_dir
from .sharding import TensorParallelError, load_rank_weights, shard_shapes, shard_transformer

DEFAULT_MAX_SEQ_LEN = 2048  # positions per cache slot when not given (fewer if the model was trained for fewer)
DEFAULT_MAX_BATCH = 1  # cache slots when not given
# A verify of up to this many ids (a speculation step: the last token and its drafts) runs a static graph, padded
# to this width: on CPU a dynamic-shape graph costs more per op than the few extra rows (docs/benchmarks/).
VERIFY_WIDTH = 8


class GenerationError(CodefillError, ValueError):
    """A request the runner cannot run; the message carries the offending values."""


class _Step(nn.Cell):
    """The prefill graph over the Transformer's cached forward."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)  # keep the Transformer's parameter names, shared by every graph
        self.model = model

    # MindSpore sets `compile_phase` on every call of a compiled graph, and Cell's setter walks every sub-cell of
    # the model through Cell.__setattr__: ~1.2 ms a call on CPU, a fifth of a decode step. Only the graph's own
    # Cell's value is read (by the graph executor), so it is kept here alone.
    @property
    def compile_phase(self):
        return self._compile_phase

    @compile_phase.setter
    def compile_phase(self, value):
        object.__setattr__(self, "_compile_phase", value)

    def construct(self, tokens, positions, cache_idx, slots, key_positions):
        return self.model(tokens, positions, cache_idx, slots, key_positions)


class _Verify(_Step):
    """The prefill graph with the logits of every new position."""

    def construct(self, tokens, positions, cache_idx, slots, key_positions):
        return self.model(tokens, positions, cache_idx, slots, key_positions, True)


class _VerifyFew(_Step):
    """A verify of up to VERIFY_WIDTH ids, static: [1, VERIFY_WIDTH], padded at the scratch column."""

    def construct(self, tokens, positions, cache_idx, slots):
        return self.model(tokens, positions, cache_idx, slots, None, True)


class _Decode(_Step):
    """Every slot, row i is slot i, every cache column."""

    def construct(self, tokens, positions, cache_idx):
        return self.model(tokens, positions, cache_idx, None, None)


class _DecodeOne(_Step):
    """One slot, every cache column of its rows only."""

    def construct(self, tokens, positions, cache_idx, slots):
        return self.model(tokens, positions, cache_idx, slots, None)


def settle_garbage() -> None:
    """Move every object alive now (the model, MindSpore's own) out of the garbage collector's scans: a step
    allocates enough Python objects to set off full collections, and each one walked all of them (about 6% of a
    decode step on CPU, docs/benchmarks/README.md). Objects made later are collected as usual."""
    gc.collect()
    gc.freeze()


def check_ids(ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """ids as int32 [T], or GenerationError naming the first bad one."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
        raise GenerationError(f"token ids must be a non-empty 1-D sequence of integers, got shape {arr.shape} "
                              f"dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = int(arr[(arr < 0) | (arr >= vocab_size)][0])
        raise GenerationError(f"token id {bad} out of range [0, {vocab_size})")
    return arr.astype(np.int32)


def check_same_architecture(serving: LlamaConfig, new: LlamaConfig, where: str) -> None:
    """Raise CheckpointError unless the LlamaConfig `new` (read from `where`) equals the serving one."""
    if new != serving:
        diff = [f"{f.name} {getattr(new, f.name)!r} (serving {getattr(serving, f.name)!r})" for f in fields(serving)
                if getattr(new, f.name) != getattr(serving, f.name)]
        raise CheckpointError(f"{where} has another architecture than the serving model: {', '.join(diff)}")


def graph_cache_dir(config: LlamaConfig, max_seq_len: int, max_batch: int, rank: int, world: int,
                    kernels: Path | None = None, precision: str = "fp32", device: str = "cpu") -> Path:
    """Where a worker keeps its compiled graphs between restarts (MindSpore's compile cache), one directory per
    everything the graphs depend on: architecture, cache shape, rank and TP size, MindSpore's version, the
    source of the modules that build them, the kernel library they call (None: the stock ops) and the
    precision. Weights
    are graph inputs, so new weights reuse the graphs."""
    import hashlib
    import json

    import codefill.inference_workers.tp_cells as tp_cells
    import codefill.model.llama as llama_module

    parts = [json.dumps(config.to_dict(), sort_keys=True), f"{max_seq_len} {max_batch} {rank} {world} {device}",
             ms.__version__, str(kernels), precision, *(Path(m.__file__).read_text() for m in (llama_module, tp_cells)),
             Path(__file__).read_text()]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]
    return cache_root() / "graphs" / key


def default_max_seq_len(config: LlamaConfig) -> int:
    return min(DEFAULT_MAX_SEQ_LEN, config.max_seq_len)


class Runner:
    """One rank's model, cache and graphs (see the module docstring). `weights`: this rank's shard (the whole
    model at world 1). `channel`: coordination.Channel on a rank of several, else None."""

    def __init__(self, config: LlamaConfig, weights: dict[str, np.ndarray], *, max_seq_len: int | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, rank: int = 0, world: int = 1, channel=None,
                 compile_cache: bool = False, device: str = "cpu", precision: str | None = None):
        max_seq_len = default_max_seq_len(config) if max_seq_len is None else max_seq_len
        if not 0 < max_seq_len <= config.max_seq_len:
            raise GenerationError(f"max_seq_len {max_seq_len} must be in [1, {config.max_seq_len}] "
                                  f"(the positions this model was trained for)")
        if max_batch < 1:
            raise GenerationError(f"max_batch must be >= 1, got {max_batch}")
        if (channel is None) != (world == 1):
            raise TensorParallelError(f"a channel is needed exactly when there are other ranks (world {world})")
        # Workers keep their compiled graphs across restarts (CODEFILL_COMPILE_CACHE=0 turns that off).
        use_cache = compile_cache and os.environ.get("CODEFILL_COMPILE_CACHE", "1") != "0"
        self.device = device
        self.precision = resolve_precision(precision, device)  # weights, activations and cache (model/precision.py)
        # The attention path, one switch by device: Ascend's fused operators; on CPU the serving kernels
        # (float32), or why the stock ops are used.
        on_ascend = device == "ascend"
        kernels = (load_kernels(TARGETS[device]) if self.precision == "fp32"
                   else KernelStatus(None, f"{self.precision}: the stock ops"))
        configure_mindspore(device, compile_cache=graph_cache_dir(config, max_seq_len, max_batch, rank, world,
                                                                  kernels.library, self.precision, device)
                            if use_cache else None)
        self.config, self.rank, self.world = config, rank, world
        self.max_seq_len, self.max_batch = max_seq_len, max_batch
        self.vocab_size = config.vocab_size
        self.idle_position = max_seq_len  # the scratch cache column: for a slot with no sequence in a decode step
        self.prefill_chunk = PREFILL_CHUNK
        self.channel = channel if channel is not None else LocalChannel()
        self.kv_heads = config.n_kv_heads // world  # the KV heads this rank's cache holds
        self.model = llama.Transformer(config, max_batch=max_batch, max_seq_len=max_seq_len)
        shard_transformer(self.model, rank, world)
        apply_precision(self.model, self.precision)
        self.kernels = use_kernels(self.model, kernels)
        if on_ascend:
            use_ascend_attention(self.model)
        self._shapes = shard_shapes(config, world)
        llama.load_weights(self.model, weights, self._shapes)
        self._prefill, self._decode, self._decode_one = self._graphs()
        self._staged: dict[str, np.ndarray] | None = None  # a reload's shard, between stage and commit
        self._stage_error: Exception | None = None
        self.closed = False
        self.busy = False  # inside a step: set while the ranks may be inside a collective
        settle_garbage()

    @classmethod
    def from_model_dir(cls, path: str | Path, *, max_seq_len: int | None = None,
                       max_batch: int | None = DEFAULT_MAX_BATCH, rank: int = 0, world: int = 1, channel=None,
                       compile_cache: bool = False, device: str = "cpu", memory: MemoryConfig | None = None,
                       default_max_batch: int = DEFAULT_MAX_BATCH, local_ranks: int = 1,
                       precision: str | None = None) -> "Runner":
        """This rank's shard of a MODEL_DIR or split directory, after its memory plan (memory_plan.py) is
        checked against `device`'s memory in the precision's dtype, before any weight is read; max_seq_len /
        max_batch None: chosen by the plan, at most the model's default / default_max_batch."""
        precision = resolve_precision(precision, device)
        plan = plan_model_dir(path, world, device, memory, max_seq_len=max_seq_len, max_batch=max_batch,
                              default_max_batch=default_max_batch, local_ranks=local_ranks,
                              dtype=PLAN_DTYPES[precision])
        config, weights = load_rank_weights(path, rank, world)
        return cls(config, weights, max_seq_len=plan.max_seq_len, max_batch=plan.max_batch, rank=rank, world=world,
                   channel=channel, compile_cache=compile_cache, device=device, precision=precision)

    def _graphs(self) -> tuple[_Step, _Decode, _DecodeOne | None]:
        i32, kv, mb = ms.int32, self.kv_heads, self.max_batch
        prefill, self._verify, self._verify_few = _Step(self.model), _Verify(self.model), _VerifyFew(self.model)
        for graph in (prefill, self._verify):
            graph.set_inputs(Tensor(shape=[1, None], dtype=i32), Tensor(shape=[1, None], dtype=i32),
                             Tensor(shape=[1, None, kv], dtype=i32), Tensor(shape=[1], dtype=i32),
                             Tensor(shape=[None], dtype=i32))
        return prefill, _Decode(self.model), _DecodeOne(self.model) if mb > 1 else None

    def compiled_graphs(self) -> dict[str, int]:
        """Graphs compiled so far per entry point: 1 each once warm; more would be a recompile."""
        graphs = {"prefill": len(self._prefill.compile_cache), "decode": len(self._decode.compile_cache)}
        for name, graph in (("verify", self._verify), ("verify_few", self._verify_few)):
            if len(graph.compile_cache):  # compiled on first use: only servers that speculate need them
                graphs[name] = len(graph.compile_cache)
        if self._decode_one is not None:
            graphs["decode_one"] = len(self._decode_one.compile_cache)
        return graphs

    # --- checked entry points (rank 0) ------------------------------------------------------------------

    def prefill(self, ids: Sequence[int], slot: int = 0, start_pos: int = 0) -> np.ndarray:
        """Run `ids` at positions start_pos.. into cache slot `slot`; logits [V] of the last one.

        Positions before start_pos must already hold this sequence's keys/values (an earlier prefill or
        decode of the same slot): that is prefix reuse.
        """
        ids = self._check_write("prefill", ids, slot, start_pos)
        self.busy = True
        for begin in range(0, len(ids), self.prefill_chunk):
            chunk = ids[begin:begin + self.prefill_chunk]
            self._announce(OP_PREFILL, len(chunk), slot, start_pos + begin, chunk)
            logits = self.run_prefill_chunk(chunk, slot, start_pos + begin)
        self.busy = False
        return logits

    def verify(self, ids: Sequence[int], slot: int, start_pos: int) -> np.ndarray:
        """Like `prefill` of a few ids (at most one chunk), but the logits of every one: [len(ids), V]. Used to
        check drafted tokens in one step; positions past the accepted ones are simply overwritten later."""
        ids = self._check_write("verify", ids, slot, start_pos)
        if len(ids) > self.prefill_chunk:
            raise GenerationError(f"verify of {len(ids)} ids: at most {self.prefill_chunk} (one chunk)")
        self.busy = True
        self._announce(OP_VERIFY, len(ids), slot, start_pos, ids)
        logits = self.run_verify(ids, slot, start_pos)
        self.busy = False
        return logits

    def _check_write(self, what: str, ids: Sequence[int], slot: int, start_pos: int) -> np.ndarray:
        """The checks of writing `ids` into `slot` from `start_pos`: ids as int32 [T], or GenerationError."""
        ids = check_ids(ids, self.vocab_size)
        if not 0 <= slot < self.max_batch:
            raise GenerationError(f"slot {slot} out of range [0, {self.max_batch})")
        if start_pos < 0 or start_pos + len(ids) > self.max_seq_len:
            raise GenerationError(f"{what} of {len(ids)} tokens at start_pos {start_pos} does not fit the cache "
                                  f"(max_seq_len {self.max_seq_len})")
        return ids

    def decode_step(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """One token per slot: tokens[i] at positions[i] in slot i -> logits [max_batch, V].

        An idle slot takes position `idle_position` (any valid token id); its logits are meaningless.
        """
        tokens = check_ids(tokens, self.vocab_size)
        pos = np.asarray(positions, dtype=np.int64)
        if tokens.shape != (self.max_batch,) or pos.shape != (self.max_batch,):
            raise GenerationError(f"decode_step takes one token and position per slot ({self.max_batch}), got "
                                  f"{tokens.shape[0]} tokens and positions of shape {pos.shape}")
        if pos.min() < 0 or pos.max() > self.max_seq_len:
            raise GenerationError(f"decode positions {pos.tolist()} out of range [0, {self.max_seq_len}]")
        pos = pos.astype(np.int32)
        self.busy = True
        self._announce(OP_DECODE, self.max_batch, 0, 0, np.concatenate([tokens, pos]))
        logits = self.run_decode(tokens, pos)
        self.busy = False
        return logits

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                 stop_ids: frozenset[int] = frozenset(), min_new_tokens: int = 0) -> Iterator[tuple[int, float]]:
        """Batch-1 generation in slot 0: yield (token id, log-prob under the unmodified softmax) one at a time.

        A token in `stop_ids` is yielded and then generation ends; none is chosen among the first
        `min_new_tokens` (as GenerateRequest.min_new_tokens). The cache must hold the prompt and every
        generated token but the last (which is never fed back): len(prompt) + max_new_tokens - 1 <= max_seq_len.
        The request is checked here, before the returned iterator runs anything.
        """
        prompt = check_ids(prompt_ids, self.vocab_size)
        if max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if len(prompt) + max(max_new_tokens - 1, 0) > self.max_seq_len:
            raise GenerationError(f"prompt of {len(prompt)} tokens + max_new_tokens {max_new_tokens} does not fit "
                                  f"the KV cache (max_seq_len {self.max_seq_len})")
        return self._generate(prompt, max_new_tokens, sampling, frozenset(stop_ids), min_new_tokens)

    def _generate(self, prompt: np.ndarray, max_new_tokens: int, sampling: SamplingConfig,
                  stop_ids: frozenset[int], min_new_tokens: int) -> Iterator[tuple[int, float]]:
        if max_new_tokens == 0:
            return
        rng = None if sampling.greedy else sampling.rng()
        logits = self.prefill(prompt, slot=0, start_pos=0)
        tokens = [0] * self.max_batch  # slot 0 decodes; the other slots, if any, sit idle
        positions = [self.idle_position] * self.max_batch
        positions[0] = len(prompt)
        for i in range(max_new_tokens):
            token = sample(without(logits, stop_ids) if i < min_new_tokens else logits, sampling, rng)
            yield token, float(log_softmax(logits)[token])
            if token in stop_ids or i == max_new_tokens - 1:
                return
            tokens[0] = token
            logits = self.decode_step(tokens, positions)[0]
            positions[0] += 1

    def reload(self, model_dir: str | Path) -> str:
        """Switch every rank to the weights of `model_dir` (same architecture), or raise and change none.
        Returns a one-line description of what now serves. The new weights take the runner's precision."""
        path = str(model_dir)
        n, payload = encode_path(path, self.channel.payload_capacity)
        self.busy = True
        self._announce(OP_STAGE, n, 0, 0, payload)
        statuses = self.channel.gather(reload_status(self.stage(path)))
        failures = reload_failures(statuses)
        if failures:
            self._announce(OP_DISCARD)
            self.discard()
            self.busy = False
            if self.world == 1:  # the error as it was raised, not wrapped in a rank report
                raise self._stage_error
            raise TensorParallelError(f"not switched to {path}: {'; '.join(failures)}")
        self._announce(OP_COMMIT)
        self.commit()
        self.busy = False
        return f"serving {path} on {self.world} rank(s)"

    def warm_up(self) -> None:
        """Compile every graph on every rank, writing only the scratch column of slot 0."""
        one = np.zeros(1, np.int32)
        self._announce(OP_PREFILL, 1, 0, self.idle_position, one)
        self.run_prefill_chunk(one, 0, self.idle_position)
        idle = np.full(self.max_batch, self.idle_position, np.int32)
        tokens = np.zeros(self.max_batch, np.int32)
        self._announce(OP_DECODE, self.max_batch, 0, 0, np.concatenate([tokens, idle]))
        self.run_decode(tokens, idle)  # no active slot: the all-slots graph
        if self._decode_one is not None:  # slot 0 alone at position 0 (no sequence is there yet): the other
            first = idle.copy()
            first[0] = 0
            self._announce(OP_DECODE, self.max_batch, 0, 0, np.concatenate([tokens, first]))
            self.run_decode(tokens, first)
        settle_garbage()  # what compiling made, too

    def close(self) -> None:
        """Tell the other ranks to return from `follow`. Idempotent."""
        if not self.closed:
            self._announce(OP_STOP)
            self.closed = True

    def _announce(self, op: int, n: int = 0, slot: int = 0, start_pos: int = 0, payload=None) -> None:
        if self.closed:
            raise TensorParallelError("the runner is closed; the other ranks have stopped")
        self.channel.announce(op, n, slot, start_pos, payload)

    # --- unchecked steps: what every rank runs ----------------------------------------------------------

    def run_prefill_chunk(self, ids: np.ndarray, slot: int, first: int, graph=None) -> np.ndarray:
        """ids int32 [T] (T <= prefill_chunk) at positions first.. of `slot` -> logits [V] of the last one
        (or [T, V] of every one through the verify graph)."""
        positions = np.arange(first, first + len(ids), dtype=np.int32)[None]  # [1, T]
        idx = llama.cache_index(np.array([slot]), positions, self.kv_heads, self.max_seq_len + 1)  # [1, T, KV]
        key_positions = np.arange(first + len(ids), dtype=np.int32)  # attend to the cache up to here
        logits = (graph or self._prefill)(Tensor(np.asarray(ids, np.int32)[None]), Tensor(positions), Tensor(idx),
                                          Tensor(np.array([slot], np.int32)), Tensor(key_positions))
        return logits.asnumpy()[0]

    def run_verify(self, ids: np.ndarray, slot: int, first: int) -> np.ndarray:
        """ids int32 [T] at positions first.. of `slot` -> logits [T, V] of every one. Up to VERIFY_WIDTH ids
        run the static graph, the rows past them at the scratch column (written there, never read)."""
        n = len(ids)
        if n > VERIFY_WIDTH:
            return self.run_prefill_chunk(ids, slot, first, self._verify)
        tokens = np.zeros((1, VERIFY_WIDTH), np.int32)
        tokens[0, :n] = ids
        positions = np.full((1, VERIFY_WIDTH), self.idle_position, np.int32)
        positions[0, :n] = np.arange(first, first + n)
        idx = llama.cache_index(np.array([slot]), positions, self.kv_heads, self.max_seq_len + 1)
        logits = self._verify_few(Tensor(tokens), Tensor(positions), Tensor(idx), Tensor(np.array([slot], np.int32)))
        return logits.asnumpy()[0, :n]

    def run_decode(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """tokens, positions int32 [max_batch] -> logits [max_batch, V]. With one active slot of several, only
        that slot runs (the other rows' logits are zeros: they are idle)."""
        tokens, pos = np.asarray(tokens, np.int32), np.asarray(positions, np.int32)
        active = np.flatnonzero(pos != self.idle_position)
        if self._decode_one is not None and active.size == 1:
            s = int(active[0])
            rows = pos[s:s + 1, None]  # [1, 1]
            idx = llama.cache_index(active, rows, self.kv_heads, self.max_seq_len + 1)
            logits = self._decode_one(Tensor(tokens[s:s + 1, None]), Tensor(rows), Tensor(idx),
                                      Tensor(active.astype(np.int32))).asnumpy()
            out = np.zeros((self.max_batch, logits.shape[-1]), np.float32)
            out[s] = logits[0]
            return out
        rows = pos[:, None]  # [B, 1]
        idx = llama.cache_index(np.arange(self.max_batch), rows, self.kv_heads, self.max_seq_len + 1)
        return self._decode(Tensor(tokens[:, None]), Tensor(rows), Tensor(idx)).asnumpy()

    def stage(self, model_dir: str) -> str | None:
        """Load this rank's shard of `model_dir` beside the live weights, checked. Returns None, or the error
        as text (a follower must stay alive; rank 0 re-raises it)."""
        self._staged, self._stage_error = None, None
        try:
            cfg, weights = load_rank_weights(model_dir, self.rank, self.world)
            where = str(model_dir) if self.world == 1 else f"{model_dir} (rank {self.rank} of {self.world})"
            check_same_architecture(self.config, cfg, where)
        except Exception as e:  # noqa: BLE001 - any load failure is a refusal; the live weights are untouched
            self._stage_error = e
            return f"{type(e).__name__}: {e}"
        self._staged = weights
        return None

    def commit(self) -> None:
        staged, self._staged = self._staged, None
        if staged is None:
            raise TensorParallelError(f"rank {self.rank}: commit without staged weights")
        llama.load_weights(self.model, staged, self._shapes)

    def discard(self) -> None:
        self._staged = None
