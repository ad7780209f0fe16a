"""The attention of the cached forward on Ascend NPUs: MindSpore's fused inference operators.

`use_ascend_attention(model)` gives every layer's `Attention.fused_attention` a `FusedCacheAttention`, the
switch `model/kernels.py` uses for the CPU kernel; the stock batched-matmul path stays the reference. The
cache is read as what it is, [max_batch, KV, S, D] in rows (input layout BNSD), no copy on the device:

- decode (T = 1, a static graph): `incre_flash_attention` with each row's key count (`actual_seq_lengths`
  = position + 1) over its slot's cache; one slot of several is a gather of that slot;
- prefill and verify (n new tokens of one slot after `start` cached ones, maybe padded to a static width at
  the scratch column): `prompt_flash_attention` with `sparse_mode` 3 (the causal mask aligned at the bottom
  right: query i sees keys 0 .. start + i) over `actual_seq_lengths` = n queries and
  `actual_seq_lengths_kv` = start + n keys, with the fixed 2048 x 2048 lower-triangular mask that mode needs.

Grouped-query attention is the operators' own (`num_key_value_heads`), the heads are this Cell's (a rank's
share after sharding). What has run: the argument layout against a stand-in with the operators' documented
semantics on CPU (tests/test_ascend_attention.py); the operators themselves need Ascend hardware, which
this project has not had.
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindspore.ops import functional as F

SPARSE_MASK = 2048  # sparse_mode 3 takes this fixed mask size


class IncreFlashAttention(nn.Cell):
    """ops.incre_flash_attention in BNSD layout: query [B, N, 1, D], key/value [B, KV, S, D], lengths [B]."""

    def __init__(self, n_heads: int, n_kv_heads: int, scale: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.scale = n_heads, n_kv_heads, scale

    def construct(self, query, key, value, actual_seq_lengths):
        return ops.incre_flash_attention(query, key, value, None, actual_seq_lengths, num_heads=self.n_heads,
                                         input_layout="BNSD", scale_value=self.scale,
                                         num_key_value_heads=self.n_kv_heads)


class PromptFlashAttention(nn.Cell):
    """ops.prompt_flash_attention in BNSD layout, sparse_mode 3: query [1, N, T, D], key/value [1, KV, S, D]."""

    def __init__(self, n_heads: int, n_kv_heads: int, scale: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.scale = n_heads, n_kv_heads, scale

    def construct(self, query, key, value, attn_mask, actual_seq_lengths, actual_seq_lengths_kv):
        return ops.prompt_flash_attention(query, key, value, attn_mask, actual_seq_lengths, actual_seq_lengths_kv,
                                          num_heads=self.n_heads, scale_value=self.scale, input_layout="BNSD",
                                          num_key_value_heads=self.n_kv_heads, sparse_mode=3)


class FusedCacheAttention(nn.Cell):
    """(q [B, T, H, D] with rotary, cache_k, cache_v rows, slots [B], positions [B, T]) -> [B, T, H, D]."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, max_batch: int, columns: int,
                 decode: nn.Cell | None = None, prefill: nn.Cell | None = None):
        super().__init__()
        scale = 1.0 / float(np.sqrt(head_dim))
        self.decode = IncreFlashAttention(n_heads, n_kv_heads, scale) if decode is None else decode
        self.prefill = PromptFlashAttention(n_heads, n_kv_heads, scale) if prefill is None else prefill
        self.cache_shape = (max_batch, n_kv_heads, columns, head_dim)
        # True above the diagonal: the keys a query may not see (sparse_mode 3 aligns it to the bottom right).
        self.causal = Tensor(np.triu(np.ones((SPARSE_MASK, SPARSE_MASK), np.bool_), 1))

    def construct(self, q, cache_k, cache_v, slots, positions):
        b, t = q.shape[0], q.shape[1]
        keys, values = cache_k.reshape(self.cache_shape), cache_v.reshape(self.cache_shape)  # [MB, KV, S, D]
        if b != self.cache_shape[0]:  # these slots' rows only
            keys, values = ops.gather(keys, slots, 0), ops.gather(values, slots, 0)
        query = q.transpose(0, 2, 1, 3)  # [B, H, T, D]
        if F.isconstant(t):
            if t == 1:  # decode: each row sees keys 0 .. its position
                lengths = (positions[:, 0] + 1).astype(ms.int64)
                return self.decode(query, keys, values, lengths).transpose(0, 2, 1, 3)
        # prefill / verify of one slot: the queries at consecutive positions after the cached ones, then any
        # padding rows at the scratch column (a static verify), which the operator leaves out
        real = positions < self.cache_shape[2] - 1
        q_len = real.astype(ms.int64).sum(-1)  # [1]
        kv_len = (ops.select(real, positions, ops.full_like(positions, -1)).max(-1) + 1).astype(ms.int64)
        return self.prefill(query, keys, values, self.causal, q_len, kv_len).transpose(0, 2, 1, 3)


def use_ascend_attention(model, decode=None, prefill=None) -> None:
    """Switch every layer's cached attention onto the fused operators (after sharding: a rank's heads).
    decode / prefill: classes standing in for the two operators' Cells, built with (heads, kv heads, scale)
    (tests on CPU); default the real ones."""
    for layer in model.layers:
        attn = layer.attention
        attn.fused_attention = FusedCacheAttention(
            attn.n_heads, attn.n_kv_heads, attn.head_dim, model.max_batch, model.max_seq_len + 1,
            None if decode is None else decode(attn.n_heads, attn.n_kv_heads, attn.scale),
            None if prefill is None else prefill(attn.n_heads, attn.n_kv_heads, attn.scale))
