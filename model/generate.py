"""Running a Transformer: prefill, decode, and a token-at-a-time generate loop over a static KV cache.

The engine knows nothing about text; it takes and yields token ids. Two compiled MindSpore graphs share one
Transformer and its cache:

- prefill: one slot, T new tokens at positions start_pos .. start_pos+T-1 -> logits of the last one. T is a
  dynamic dimension (`Cell.set_inputs` with `None`), so one graph serves every prompt length.
- decode: one token for every slot at once ([max_batch, 1], each row with its own position; row i is cache
  slot i, an idle slot is given position `max_seq_len`, the scratch column) -> logits [max_batch, V]. Its shapes
  are static.

Neither graph recompiles per token or per prompt length (`compiled_graphs()` counts; the tests check it).
Prompts longer than `prefill_chunk` (512) are prefilled in chunks through the same graph.

Why dynamic T rather than length buckets: measured in one process on the 2-core CPU dev machine (shared with
other jobs, so +-30% noise), preset "small" (dim 512, 8 layers, GQA 8/4, vocab 32016), max_seq_len 2048, batch 1:

    prompt tokens                      256       1024      2048
    dynamic-T graph (one compile)    196 ms    930 ms   3916 ms (one piece) / ~2360 ms in 512-token chunks
    graph compiled for exactly T     194 ms    949 ms   1720 ms
    compile of that static graph     ~1.9 s    ~6.6 s   ~16.5 s   (grows with T; dynamic: ~2.2 s once)

Static shapes only win at 2048 in one piece, probably because the dynamic graph allocates its 100+ MB score
buffers per layer per call instead of planning them; chunking recovers most of that. Buckets would cost 2-17 s of compile per bucket at startup or on first use,
plus padding, so: one dynamic graph plus chunking. Decode (static shapes) is 17-19 ms per step with a
2048-position cache (Hugging Face with its growing cache: ~19 ms); compile ~1.8 s. Attention reads the whole
static cache in decode (memory-bound: ~4 ms of the step at 2048 vs ~64 positions) and, in prefill, only the
columns up to the chunk's last position. Full table: `codefill/bench_model.py`.

Process-wide MindSpore settings (graph mode, CPU target) are made by `configure_mindspore()`, which
`Generator.__init__` calls; importing this module changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from .config import LlamaConfig
from .sampling import SamplingConfig, log_softmax, sample


PREFILL_CHUNK = 512  # tokens per prefill graph call; longer prompts are prefilled in chunks


class GenerationError(ValueError):
    """A request the generator cannot run; the message carries the offending values."""


def configure_mindspore(device_target: str = "CPU") -> None:
    """Graph mode (compiled, ~20x faster than PyNative for decode) on the given device. Idempotent."""
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device(device_target)


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


def check_prefill(ids: Sequence[int], slot: int, start_pos: int, *, vocab_size: int, max_batch: int,
                  max_seq_len: int) -> np.ndarray:
    """The checks of a prefill call (shared by Generator and the tensor-parallel runner): ids as int32 [T]."""
    ids = check_ids(ids, vocab_size)
    if not 0 <= slot < max_batch:
        raise GenerationError(f"slot {slot} out of range [0, {max_batch})")
    if start_pos < 0 or start_pos + len(ids) > max_seq_len:
        raise GenerationError(f"prefill of {len(ids)} tokens at start_pos {start_pos} does not fit the cache "
                              f"(max_seq_len {max_seq_len})")
    return ids


def check_decode(tokens: Sequence[int], positions: Sequence[int], *, vocab_size: int, max_batch: int,
                 max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The checks of a decode step: (tokens, positions) as int32 [max_batch]."""
    tokens = check_ids(tokens, vocab_size)
    pos = np.asarray(positions, dtype=np.int64)
    if tokens.shape != (max_batch,) or pos.shape != (max_batch,):
        raise GenerationError(f"decode_step takes one token and position per slot ({max_batch}), got "
                              f"{tokens.shape[0]} tokens and positions of shape {pos.shape}")
    if pos.min() < 0 or pos.max() > max_seq_len:
        raise GenerationError(f"decode positions {pos.tolist()} out of range [0, {max_seq_len}]")
    return tokens, pos.astype(np.int32)


def graph_cells(model, n_kv_heads: int | None = None):
    """Two thin Cells around one Transformer: the prefill and decode graphs. `auto_prefix=False` keeps the
    Transformer's parameter names (`layers.0.attention.wq.weight`), shared by both graphs. `n_kv_heads`: the
    KV heads this model's cache holds (a tensor-parallel rank holds n_kv_heads / TP; default: all)."""
    import mindspore as ms
    from mindspore import Tensor, nn

    class Prefill(nn.Cell):
        def __init__(self, m):
            super().__init__(auto_prefix=False)
            self.model = m

        def construct(self, tokens, positions, cache_idx, slots, key_positions):
            return self.model(tokens, positions, cache_idx, slots, key_positions)

    class Decode(nn.Cell):
        def __init__(self, m):
            super().__init__(auto_prefix=False)
            self.model = m

        def construct(self, tokens, positions, cache_idx):
            return self.model(tokens, positions, cache_idx, None, None)  # row i is slot i, whole cache: no copy

    kv, mb = n_kv_heads or model.config.n_kv_heads, model.max_batch
    prefill, decode = Prefill(model), Decode(model)
    prefill.set_inputs(Tensor(shape=[1, None], dtype=ms.int32), Tensor(shape=[1, None], dtype=ms.int32),
                       Tensor(shape=[1, None, kv, 3], dtype=ms.int32), Tensor(shape=[1], dtype=ms.int32),
                       Tensor(shape=[None], dtype=ms.int32))
    decode.set_inputs(Tensor(shape=[mb, 1], dtype=ms.int32), Tensor(shape=[mb, 1], dtype=ms.int32),
                      Tensor(shape=[mb, 1, kv, 3], dtype=ms.int32))
    return prefill, decode


class Generator:
    """A Transformer with its weights loaded, its KV cache (max_batch slots x max_seq_len) and two graphs."""

    def __init__(self, config: LlamaConfig, weights: dict[str, np.ndarray], max_seq_len: int = 2048,
                 max_batch: int = 1):
        if not 0 < max_seq_len <= config.max_seq_len:
            raise GenerationError(f"max_seq_len {max_seq_len} must be in [1, {config.max_seq_len}] "
                                  f"(the positions this model was trained for)")
        if max_batch < 1:
            raise GenerationError(f"max_batch must be >= 1, got {max_batch}")
        configure_mindspore()
        from . import llama

        self.config, self.max_seq_len, self.max_batch = config, max_seq_len, max_batch
        self.prefill_chunk = PREFILL_CHUNK
        self.model = llama.Transformer(config, max_batch=max_batch, max_seq_len=max_seq_len)
        llama.load_weights(self.model, weights)
        self._prefill, self._decode = graph_cells(self.model)
        self._cache_index = llama.cache_index

    @classmethod
    def from_model_dir(cls, path: str | Path, max_seq_len: int | None = None, max_batch: int = 1) -> "Generator":
        """max_seq_len None: 2048 positions, or fewer when the model was trained for fewer."""
        from .checkpoint import load_model_dir

        files = load_model_dir(path)
        if max_seq_len is None:
            max_seq_len = min(2048, files.config.max_seq_len)
        return cls(files.config, files.weights, max_seq_len=max_seq_len, max_batch=max_batch)

    @property
    def idle_position(self) -> int:
        """The position to give decode_step for a slot with no sequence (its write goes to scratch)."""
        return self.max_seq_len

    def compiled_graphs(self) -> dict[str, int]:
        """Graphs compiled so far per entry point: 1 each once warm; more would be a recompile."""
        return {"prefill": len(self._prefill.compile_cache), "decode": len(self._decode.compile_cache)}

    # --- the two graphs ------------------------------------------------------------------------------

    def prefill(self, ids: Sequence[int], slot: int = 0, start_pos: int = 0) -> np.ndarray:
        """Run `ids` at positions start_pos.. into cache slot `slot`; logits [V] of the last one.

        Positions before start_pos must already hold this sequence's keys/values (an earlier prefill or
        decode of the same slot): that is prefix reuse.
        """
        from mindspore import Tensor

        ids = check_prefill(ids, slot, start_pos, vocab_size=self.config.vocab_size, max_batch=self.max_batch,
                            max_seq_len=self.max_seq_len)
        # Long prompts go in chunks onto the cache (the prefix-reuse path): this bounds the [KV, T*R, K] scores
        # tensor, which in one piece made a 2048-token prefill ~2x slower per token than 1024 (see the module
        # docstring), and costs nothing measurable at shorter lengths.
        for begin in range(0, len(ids), self.prefill_chunk):
            chunk = ids[begin:begin + self.prefill_chunk]
            first = start_pos + begin
            positions = np.arange(first, first + len(chunk), dtype=np.int32)[None]  # [1, T]
            idx = self._cache_index(np.array([slot]), positions, self.config.n_kv_heads)
            key_positions = np.arange(first + len(chunk), dtype=np.int32)  # attend to the cache up to here
            logits = self._prefill(Tensor(chunk[None]), Tensor(positions), Tensor(idx),
                                   Tensor(np.array([slot], np.int32)), Tensor(key_positions))
        return logits.asnumpy()[0]

    def decode_step(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """One token per slot: tokens[i] at positions[i] in slot i -> logits [max_batch, V].

        An idle slot takes position `idle_position` (any valid token id); its logits are meaningless.
        """
        from mindspore import Tensor

        tokens, pos = check_decode(tokens, positions, vocab_size=self.config.vocab_size, max_batch=self.max_batch,
                                   max_seq_len=self.max_seq_len)
        pos = pos[:, None]  # [B, 1]
        idx = self._cache_index(np.arange(self.max_batch), pos, self.config.n_kv_heads)
        return self._decode(Tensor(tokens[:, None]), Tensor(pos), Tensor(idx)).asnumpy()

    # --- batch-1 generation --------------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                 stop_ids: frozenset[int] = frozenset()) -> Iterator[tuple[int, float]]:
        """Yield (token id, log-prob under the unmodified softmax) one at a time, in slot 0.

        A token in `stop_ids` is yielded and then generation ends. The cache must hold the prompt and every
        generated token but the last (which is never fed back): len(prompt) + max_new_tokens - 1 <= max_seq_len.
        The request is checked here, before the returned iterator runs anything.
        """
        prompt = check_ids(prompt_ids, self.config.vocab_size)
        if max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if len(prompt) + max(max_new_tokens - 1, 0) > self.max_seq_len:
            raise GenerationError(f"prompt of {len(prompt)} tokens + max_new_tokens {max_new_tokens} does not fit "
                                  f"the KV cache (max_seq_len {self.max_seq_len})")
        return self._generate(prompt, max_new_tokens, sampling, frozenset(stop_ids))

    def _generate(self, prompt: np.ndarray, max_new_tokens: int, sampling: SamplingConfig,
                  stop_ids: frozenset[int]) -> Iterator[tuple[int, float]]:
        if max_new_tokens == 0:
            return
        rng = None if sampling.greedy else sampling.rng()
        logits = self.prefill(prompt, slot=0, start_pos=0)
        tokens = [0] * self.max_batch  # slot 0 decodes; the other slots, if any, sit idle
        positions = [self.idle_position] * self.max_batch
        positions[0] = len(prompt)
        for i in range(max_new_tokens):
            token = sample(logits, sampling, rng)
            yield token, float(log_softmax(logits)[token])
            if token in stop_ids or i == max_new_tokens - 1:
                return
            tokens[0] = token
            logits = self.decode_step(tokens, positions)[0]
            positions[0] += 1
