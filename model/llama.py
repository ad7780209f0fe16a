"""A plain MindSpore Llama / Code Llama: RMSNorm, half-split rotary, grouped-query attention, SwiGLU, output head.
Qwen2 (Qwen2.5-Coder) and DeepSeek-Coder are this model with q/k/v biases and linear rope scaling switched
on by their config (`attention_bias`, `rope_scaling_factor`).

This is the one definition of the model. It has two forwards, built from the same layers:

- **cached** (serving): `model(tokens, positions, cache_idx, slots, key_positions)` writes the new keys/values
  into the static KV cache and returns the logits of each row's last position, [B, V];
- **all positions, no cache** (training, evaluation of a loss): `model(tokens, positions)` attends over the
  row's own tokens and returns logits for every position, [B, T, V].

No parallelism or adapters live here. Transforms swap child Cells of a built model, keeping parameter names:
`inference_workers/sharding.py` cuts it into a tensor-parallel shard (for serving and training alike), and
`training/lora.py` wraps projections with LoRA adapters. On CPU the runner switches the cached forward onto
fused kernels (`kernels.use_kernels`: projections, norms, rotary, gate and attention reading the cache rows in
place, a plain layer as four ops); these stock ops stay the reference and the path of every other device. Parameter names are the codefill names of
`weights.expected_shapes` (`layers.3.attention.wq.weight`), so `load_weights` fills a model from a dict of
numpy arrays by name and refuses anything missing, extra or mis-shaped.

The KV cache is static (gpt-fast style): every layer owns `cache_k` / `cache_v` Parameters holding
[max_batch, n_kv_heads, max_seq_len + 1, head_dim] values as rows of head_dim, row (slot * KV + kv) * S + pos,
preallocated once and updated in place, row by row, with `ScatterUpdate` (`scatter_nd_update` on the 4-D
tensor copies all of it on every write on CPU). A cached forward writes the new keys/values at their positions, then attends over the
cache row with a position mask (key j is visible to a query at position p iff j <= p), so

- prefill of only the new tokens of a prompt onto an existing cache (prefix reuse) is `start_pos > 0`,
- batched decode gives each row its own position (continuous batching),
- stale entries past a row's position, left by an earlier longer sequence, are never seen.

Column `max_seq_len` of the cache is scratch: a decode row whose slot is idle is given that position, so it
writes there and its logits are ignored (all of the cache stays finite, so no NaN can leak into a live row).

Shapes in comments: B batch rows, T new tokens, S = max_seq_len + 1 cache columns, K keys read, H query heads,
KV key/value heads, R = H // KV, D head_dim, V vocab.
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from codefill.errors import CodefillError

from .config import LlamaConfig
from .weights import expected_shapes


class WeightError(CodefillError, ValueError):
    """Weights that do not fit the model; the message names the tensor and its shapes."""


class Linear(nn.Cell):
    """y = x @ weight.T (+ bias) with weight [out, in] (the Hugging Face / Meta layout); a bias [out] only
    where the architecture has one (Qwen2's q/k/v)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        # Lazy zeros: memory is only allocated when load_weights sets real data.
        self.weight = Parameter(initializer("zeros", (out_features, in_features), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (out_features,), ms.float32), name="bias") if bias else None
        self.matmul = ops.MatMul(transpose_b=True)
        self.out_features = out_features
        self.kernels = None  # kernels.use_kernels sets it (serving on CPU): the projection on every core

    def construct(self, x):
        if self.kernels is not None:
            y = self.kernels.linear(x, self.weight)  # [..., in] -> [..., out]
            return y if self.bias is None else y + self.bias
        # x [..., in] -> [N, in] -> [N, out] -> [..., out]
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, x.shape[-1]), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(lead + (self.out_features,))


class Embedding(nn.Cell):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = Parameter(initializer("zeros", (vocab_size, dim), ms.float32), name="weight")

    def construct(self, tokens):
        return ops.gather(self.weight, tokens, 0)  # [B, T] -> [B, T, dim]


def rms_norm(x, weight, eps: float):
    if x.dtype == ms.float32:
        return x * ops.rsqrt((x * x).mean(-1, keep_dims=True) + eps) * weight
    x32 = x.astype(ms.float32)  # half precision: the statistics in float32, as Hugging Face computes them
    return (x32 * ops.rsqrt((x32 * x32).mean(-1, keep_dims=True) + eps)).astype(x.dtype) * weight


def to_float32(x):
    return x if x.dtype == ms.float32 else x.astype(ms.float32)  # logits and sampling are always float32


def softmax(scores):
    if scores.dtype == ms.float32:
        return ops.softmax(scores, -1)
    return ops.softmax(scores.astype(ms.float32), -1).astype(scores.dtype)


class RMSNorm(nn.Cell):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = Parameter(initializer("ones", (dim,), ms.float32), name="weight")
        self.eps = eps
        self.eps_tensor = Tensor([eps], ms.float32)
        self.kernels = None  # kernels.use_kernels sets it (serving on CPU): one op instead of six

    def construct(self, x):
        if self.kernels is not None:
            return self.kernels.rms_norm(x, self.weight, self.eps_tensor)
        return rms_norm(x, self.weight, self.eps)


def rotary_tables(head_dim: int, n_positions: int, theta: float,
                  scaling_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [n_positions, head_dim] in the half-split layout: frequency i sits at columns i and i + D/2.
    Linear rope scaling (`scaling_factor` > 1, DeepSeek-Coder's 4) divides every frequency by the factor,
    as Hugging Face's "linear" rope type does: position p turns like position p / factor.

    Computed in float64 and rounded once, so long positions do not accumulate float32 angle error.
    """
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim) / scaling_factor  # [D/2]
    angles = np.outer(np.arange(n_positions, dtype=np.float64), inv_freq)  # [P, D/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [P, D]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rotary(x, cos, sin):
    # x [B, T, heads, D]; cos, sin [B, T, 1, D]. rotate_half(x) = cat(-x2, x1): Hugging Face's layout.
    half = x.shape[-1] // 2
    rotated = ops.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


class Attention(nn.Cell):
    """Grouped-query attention. `n_heads` / `n_kv_heads` are this Cell's own heads: all of them in the plain
    model, a rank's share in a tensor-parallel shard (sharding.py sets them; R and D never change)."""

    def __init__(self, cfg: LlamaConfig, max_batch: int, max_seq_len: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.n_rep = cfg.n_rep
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, cfg.attention_bias)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.attention_bias)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, cfg.attention_bias)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.cache_k, self.cache_v = kv_cache(max_batch, cfg.n_kv_heads, max_seq_len, cfg.head_dim)
        self.max_batch = max_batch
        self.write_rows = ops.ScatterUpdate()
        self.scale = 1.0 / float(np.sqrt(cfg.head_dim))
        self.scores_matmul = ops.BatchMatMul(transpose_b=True)  # q @ k^T without materialising k^T
        self.kernels = None  # kernels.use_kernels sets it: the cached forward's rotary in one op
        self.fused_qkv = False  # and this, where q, k, v are plain bias-free projections: them, rotary and the
        # cache write in one op, before the CPU attention kernel
        # A fused attention over the cache for the cached forward, chosen by device: None (these stock ops, the
        # reference), the CPU kernel (kernels.py) or Ascend's fused operators (ascend_attention.py). A Cell
        # (q [B, T, H, D] with rotary, cache_k, cache_v, slots [B], positions [B, T]) -> [B, T, H, D].
        self.fused_attention = None
        self.every_slot = Tensor(np.arange(max_batch, dtype=np.int32))  # [max_batch]: row i is slot i

    def construct(self, x, cos, sin, mask, cache_idx, slots, key_positions, positions):
        # x [B, T, dim]; positions [B, T]; mask [B, 1, T*R, K]. cache_idx [B, T, KV]: the cache row of each new key, or None:
        # no cache, the keys are the T new positions themselves (the training forward). With a cache, the keys
        # read: slots [B] (cache row of each batch row; None: row i is slot i, every slot and every column)
        # at key_positions [K] (cache columns).
        b, t = x.shape[0], x.shape[1]
        if self.fused_qkv and cache_idx is not None:
            # One kernel projects q, k and v, applies the rotary embedding and writes k and v into the cache rows
            # cache_idx names; the attention kernel then reads them there.
            q = self.kernels.qkv_cache(x, self.wq.weight, self.wk.weight, self.wv.weight, cos, sin, self.cache_k,
                                       self.cache_v, cache_idx).reshape(b, t, self.n_heads, self.head_dim)
            out = self.fused_attention(q, self.cache_k, self.cache_v, self.every_slot if slots is None else slots,
                                       positions)  # [B, T, H, D]
            return self.wo(out.reshape(b, t, self.n_heads * self.head_dim))
        q = self.wq(x).reshape(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = self.wv(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        if self.kernels is not None and cache_idx is not None:
            q, k = self.kernels.rotary(q, cos, sin), self.kernels.rotary(k, cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache_idx is None:
            keys, values = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]
        else:
            # Write the new keys/values in place: [B, T, KV, D] into the rows cache_idx [B, T, KV] names.
            self.write_rows(self.cache_k, cache_idx, k)
            self.write_rows(self.cache_v, cache_idx, v)
            if self.fused_attention is not None:
                # Each query over its slot's keys at columns 0..its position, read from the cache (no mask here).
                out = self.fused_attention(q, self.cache_k, self.cache_v, self.every_slot if slots is None
                                           else slots, positions)  # [B, T, H, D]
                return self.wo(out.reshape(b, t, self.n_heads * self.head_dim))
            if slots is None:  # decode of every slot: the whole cache [max_batch, KV, S, D]
                keys = self.cache_k.reshape(self.max_batch, self.n_kv_heads, -1, self.head_dim)
                values = self.cache_v.reshape(self.max_batch, self.n_kv_heads, -1, self.head_dim)
            else:  # the rows of these slots at these columns [B, KV, K, D], read straight from the cache
                columns = self.cache_k.shape[0] // (self.max_batch * self.n_kv_heads)
                heads = ops.arange(0, self.n_kv_heads, dtype=ms.int32).reshape(1, -1, 1)
                rows = (slots.reshape(-1, 1, 1) * self.n_kv_heads + heads) * columns + key_positions.reshape(1, 1, -1)
                keys, values = ops.gather(self.cache_k, rows, 0), ops.gather(self.cache_v, rows, 0)

        # Grouped-query attention without copying K/V per query head: query head h = kv * R + r uses kv head
        # h // R (Hugging Face's repeat_kv), so rows (t, r) of [B, KV, T*R, D] go against kv head `kv` in one
        # matmul; the mask is built in the same row order, so scores are never reshaped.
        q = q * self.scale  # scaling q is T*H*D multiplies, scaling scores T*H*K
        q = q.reshape(b, t, self.n_kv_heads, self.n_rep, self.head_dim).transpose(0, 2, 1, 3, 4)
        q = q.reshape(b, self.n_kv_heads, t * self.n_rep, self.head_dim)
        scores = self.scores_matmul(q, keys) + mask  # [B, KV, T*R, K]
        out = ops.matmul(softmax(scores), values)  # [B, KV, T*R, D]
        out = out.reshape(b, self.n_kv_heads, t, self.n_rep, self.head_dim).transpose(0, 2, 1, 3, 4)
        return self.wo(out.reshape(b, t, self.n_heads * self.head_dim))  # [B, T, KV, R, D] -> [B, T, dim]


def kv_cache(max_batch: int, n_kv_heads: int, max_seq_len: int, head_dim: int) -> tuple[Parameter, Parameter]:
    """Zeroed cache_k, cache_v [max_batch * KV * (max_seq_len + 1), D]: [max_batch, KV, S, D] in rows, heads
    before positions so attention reads it without a transpose; the last column is the scratch column."""
    shape = (max_batch * n_kv_heads * (max_seq_len + 1), head_dim)
    return (Parameter(Tensor(np.zeros(shape, np.float32)), name="cache_k", requires_grad=False),
            Parameter(Tensor(np.zeros(shape, np.float32)), name="cache_v", requires_grad=False))


class FeedForward(nn.Cell):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.w1 = Linear(dim, ffn_dim)
        self.w2 = Linear(ffn_dim, dim)
        self.w3 = Linear(dim, ffn_dim)
        self.kernels = None  # kernels.use_kernels sets it: silu(a) * b in one op
        self.fused = False  # and this, where w1 and w3 are plain projections: both and the gate in one op

    def construct(self, x):
        if self.fused:
            return self.w2(self.kernels.swiglu(x, self.w1.weight, self.w3.weight))
        if self.kernels is not None:
            return self.w2(self.kernels.silu_mul(self.w1(x), self.w3(x)))
        return self.w2(ops.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Cell):
    def __init__(self, cfg: LlamaConfig, max_batch: int, max_seq_len: int):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, max_batch, max_seq_len)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.fused = False  # kernels.use_kernels sets it (CPU, one process): the cached forward in four kernels

    def construct(self, x, cos, sin, mask, cache_idx, slots, key_positions, positions):
        if self.fused and cache_idx is not None:
            return self.fused_forward(x, cos, sin, cache_idx, slots, positions)
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache_idx, slots, key_positions, positions)
        return h + self.feed_forward(self.ffn_norm(h))

    def fused_forward(self, x, cos, sin, cache_idx, slots, positions):
        """The cached forward of this block as four CPU kernels: norm, q/k/v, rotary, cache write and attention;
        the output projection with the residual; norm, gate and up; the down projection with the residual."""
        attn, ff = self.attention, self.feed_forward
        k = attn.kernels
        out = k.attention_block(x, self.attention_norm.weight, self.attention_norm.eps_tensor, attn.wq.weight,
                                attn.wk.weight, attn.wv.weight, cos, sin, attn.cache_k, attn.cache_v, cache_idx,
                                attn.every_slot if slots is None else slots, positions,
                                attn.fused_attention.cache_shape)
        h = k.linear_add(out, attn.wo.weight, x)
        return k.linear_add(k.norm_swiglu(h, self.ffn_norm.weight, self.ffn_norm.eps_tensor, ff.w1.weight,
                                          ff.w3.weight), ff.w2.weight, h)


class Transformer(nn.Cell):
    """Token ids in, logits out; all inputs int32.

    Cached forward: `(tokens [B, T], positions [B, T], cache_idx [B, T, KV], slots [B] | None,
    key_positions [K] | None) -> logits [B, V]` of each row's last position, with the static KV cache updated
    in place. Positions lie in [0, max_seq_len]; `max_seq_len` itself is the scratch column. Row b reads
    cache row slots[b] (None: row i is slot i), columns key_positions (None: all of them). Callers build the
    index arrays with `cache_index`. `every_position=True`: logits [B, T, V] of every new position (verifying
    drafted tokens).

    All-position forward: `(tokens [B, T], positions [B, T]) -> logits [B, T, V]`, causal over each row's own
    positions, the cache neither read nor written.
    """

    def __init__(self, cfg: LlamaConfig, max_batch: int = 1, max_seq_len: int = 2048):
        super().__init__()
        self.config, self.max_batch, self.max_seq_len = cfg, max_batch, max_seq_len
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.CellList([TransformerBlock(cfg, max_batch, max_seq_len) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = Linear(cfg.dim, cfg.vocab_size)
        cos, sin = rotary_tables(cfg.head_dim, max_seq_len + 1, cfg.rope_theta, cfg.rope_scaling_factor)
        self.rope_cos, self.rope_sin = Tensor(cos), Tensor(sin)  # [S, D] constants, not weights
        self.key_positions = Tensor(np.arange(max_seq_len + 1, dtype=np.int32))  # [S]
        self.dtype = ms.float32  # of weights, activations and cache: precision.apply_precision changes it

    def construct(self, tokens, positions, cache_idx=None, slots=None, key_positions=None, every_position=False):
        x = self.tok_embeddings(tokens)  # [B, T, dim]
        cos = ops.gather(self.rope_cos, positions, 0).expand_dims(2)  # [B, T, 1, D]
        sin = ops.gather(self.rope_sin, positions, 0).expand_dims(2)
        # Additive causal mask over the keys read: key j is visible to a query at position p iff j <= p.
        # Rows in attention's (t, r) order: [B, T] -> [B, T*R] query positions.
        b, t = positions.shape[0], positions.shape[1]
        query_pos = ops.tile(positions.expand_dims(-1), (1, 1, self.config.n_rep)).reshape(b, -1, 1)
        if cache_idx is None:
            key_pos = positions.reshape(b, 1, t)  # [B, 1, T]: the row's own positions
        else:
            if key_positions is None:  # decode: every column of the cache rows
                key_positions = self.key_positions
            key_pos = key_positions.reshape(1, 1, -1)  # [1, 1, K]
        visible = key_pos <= query_pos  # [B, T*R, K]
        zeros = ops.zeros_like(visible.astype(self.dtype))
        hidden = -1e30 if self.dtype == ms.float32 else -6e4  # float16 ends at -65504; exp() of either is 0
        mask = ops.select(visible, zeros, zeros + hidden).expand_dims(1)  # [B, 1, T*R, K]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache_idx, slots, key_positions, positions)
        if cache_idx is None or every_position:
            return to_float32(self.output(self.norm(x)))  # every position: [B, T, V]
        return to_float32(self.output(self.norm(x[:, -1])))  # only the last position's logits: [B, V]


def cache_index(slots: np.ndarray, positions: np.ndarray, n_kv_heads: int, n_columns: int) -> np.ndarray:
    """The cache row of every new key: slots [B], positions [B, T] -> [B, T, KV] int32, row
    (slot * KV + kv) * n_columns + position (n_columns = max_seq_len + 1)."""
    slots = np.asarray(slots, np.int64).reshape(-1, 1, 1)
    heads = np.arange(n_kv_heads, dtype=np.int64).reshape(1, 1, -1)
    return ((slots * n_kv_heads + heads) * n_columns + np.asarray(positions, np.int64)[:, :, None]).astype(np.int32)


def weight_parameters(model: Transformer) -> dict[str, Parameter]:
    """The model's weights by codefill name: the tensors of `expected_shapes`, whatever transforms added
    beside them (the KV cache is state, LoRA adapters are trained separately)."""
    names = expected_shapes(model.config)
    return {name: p for name, p in model.parameters_and_names() if name in names}


def load_weights(model: Transformer, weights: dict[str, np.ndarray],
                 shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Copy a {codefill name: array} dict into the model, strictly: any missing, extra or mis-shaped tensor
    raises WeightError naming it, before a single parameter is changed. `shapes`: the shapes expected (a
    tensor-parallel shard's, from sharding.shard_shapes); default the whole model's."""
    params = weight_parameters(model)
    expected = expected_shapes(model.config) if shapes is None else shapes
    if set(params) != set(expected):  # a bug in this file or a transform, not in the weights
        raise WeightError(f"model parameters differ from the expected tensors: {sorted(set(params) ^ set(expected))[:8]}")
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise WeightError(f"weights do not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}"
                          f" ({len(missing)}), unexpected {extra[:8]}{'...' if len(extra) > 8 else ''} ({len(extra)})")
    for name, shape in expected.items():
        got = tuple(np.shape(weights[name]))
        if got != shape or tuple(params[name].shape) != shape:
            raise WeightError(f"tensor {name} has shape {got}, the model expects {shape} "
                              f"(parameter {tuple(params[name].shape)})")
    for name, p in params.items():
        p.set_data(Tensor(np.ascontiguousarray(weights[name], dtype=np.float32), dtype=p.dtype))
