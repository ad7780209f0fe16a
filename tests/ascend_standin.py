"""Stand-ins for Ascend's fused attention operators, for tests on CPU: the semantics their documentation
gives (MindSpore 2.10 `ops.incre_flash_attention`, `ops.prompt_flash_attention`), in stock MindSpore ops,
with the same arguments and layouts codefill passes (BNSD, grouped-query heads, sequence lengths)."""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops


def _attend(query, key, value, visible, n_heads, n_kv_heads, scale):
    # query [B, N, T, D], key/value [B, KV, S, D], visible [B, 1, T, S]: head h reads kv head h // (N / KV)
    key = ops.repeat_interleave(key, n_heads // n_kv_heads, 1)
    value = ops.repeat_interleave(value, n_heads // n_kv_heads, 1)
    scores = ops.matmul(query, key.swapaxes(-1, -2)) * scale
    scores = ops.select(ops.broadcast_to(visible, scores.shape), scores, ops.full_like(scores, -1e30))
    return ops.matmul(ops.softmax(scores, -1), value)


class IncreFlashStandIn(nn.Cell):
    """incre_flash_attention, BNSD: query [B, N, 1, D]; batch row b sees keys 0 .. actual_seq_lengths[b] - 1."""

    def __init__(self, n_heads, n_kv_heads, scale):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.scale = n_heads, n_kv_heads, scale

    def construct(self, query, key, value, actual_seq_lengths):
        columns = ops.arange(0, key.shape[2], dtype=ms.int64).reshape(1, 1, 1, -1)
        visible = columns < actual_seq_lengths.reshape(-1, 1, 1, 1)
        return _attend(query, key, value, visible, self.n_heads, self.n_kv_heads, self.scale)


class PromptFlashStandIn(nn.Cell):
    """prompt_flash_attention, BNSD, sparse_mode 3 (rightDownCausal): query i of q_len sees keys
    0 .. kv_len - q_len + i; the 2048 x 2048 mask must be the lower-triangular one that mode requires."""

    def __init__(self, n_heads, n_kv_heads, scale):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.scale = n_heads, n_kv_heads, scale

    def construct(self, query, key, value, attn_mask, actual_seq_lengths, actual_seq_lengths_kv):
        rows = ops.arange(0, query.shape[2], dtype=ms.int64).reshape(1, 1, -1, 1)
        columns = ops.arange(0, key.shape[2], dtype=ms.int64).reshape(1, 1, 1, -1)
        offset = (actual_seq_lengths_kv - actual_seq_lengths).reshape(-1, 1, 1, 1)
        visible = ops.logical_and(columns <= rows + offset, columns < actual_seq_lengths_kv.reshape(-1, 1, 1, 1))
        # the mask sparse_mode 3 needs: True strictly above the diagonal of a 2048 x 2048 block
        ok = ops.logical_and(attn_mask[0, 1], ops.logical_not(attn_mask[1, 0])).astype(ms.float32)
        return _attend(query, key, value, visible, self.n_heads, self.n_kv_heads, self.scale) * ok
