"""The training loss over the one model: `llama.Transformer`'s all-position forward (no KV cache) and the
summed token cross-entropy.

Transforms applied to the model before this wraps it are trained as they are: a tensor-parallel shard
(`sharding.shard_transformer`, whose collectives carry the backward training needs) and LoRA adapters
(`lora.apply_lora`). Parameter names stay the model's (`layers.0.attention.wq.weight`), which the optimiser
state and the checkpoints are keyed by.

Shapes: B rows, T positions, V vocab.
"""

from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import nn, ops

from .mindrecord_io import IGNORE_INDEX


class LanguageModelLoss(nn.Cell):
    """(tokens [B, T], labels [B, T], seed) -> summed cross-entropy over labels != IGNORE_INDEX (a scalar).

    A sum, not a mean: the trainer divides by the labelled-token count of the whole global batch. `seed`
    (float32 scalar) drives LoRA dropout when adapters are applied (`lora_seed`: their shared seed Parameter):
    0 at evaluation (no dropout), else a per-micro-batch value."""

    def __init__(self, model, lora_seed=None):
        super().__init__(auto_prefix=False)
        self.model = model
        self.lora_seed = lora_seed
        self.vocab_size = model.config.vocab_size

    def construct(self, tokens, labels, seed):
        if self.lora_seed is not None:
            ops.assign(self.lora_seed, seed)
        b, t = tokens.shape[0], tokens.shape[1]
        positions = ops.tile(ops.arange(0, t, dtype=ms.int32).reshape(1, t), (b, 1))  # [B, T]
        logits = self.model(tokens, positions).reshape(-1, self.vocab_size)  # [B*T, V]
        labels = labels.reshape(-1)
        valid = labels != IGNORE_INDEX
        target = ops.select(valid, labels, ops.zeros_like(labels))
        logp = ops.log_softmax(logits, -1)
        picked = ops.gather_elements(logp, 1, target.reshape(-1, 1)).reshape(-1)  # [B*T]
        return -(picked * valid.astype(ms.float32)).sum()


def shifted(rows_ids: np.ndarray, rows_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Data rows [B, L+1] -> (inputs ids[:, :-1], targets labels[:, 1:]), both [B, L] int32."""
    return (np.ascontiguousarray(rows_ids[:, :-1], np.int32), np.ascontiguousarray(rows_labels[:, 1:], np.int32))
