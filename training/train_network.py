"""The training forward: all-position logits of the plain model, without its KV cache, and the token loss.

`model/llama.py` computes only the last position and writes its static KV cache, which is what serving wants.
Training needs every position and no cache, so this file re-runs the same math with the same Cells and
Parameters (the model's RMSNorm, Linear and Embedding Cells are called directly; rotary tables and
`apply_rotary` are the model's own), with a plain causal mask over the sequence. Nothing is copied: a weight
updated here is the weight the model serves with. Parity with the serving path is tested.

Every wrapper Cell here is built with auto_prefix=False so MindSpore keeps the model's parameter names
(`layers.0.attention.wq.weight`), which the optimiser state and the checkpoints are keyed by.

The same Cell trains a tensor-parallel shard (tp_train.py): head counts come from the attention Cell (the
shard's own, H/N and KV/N), and `replicated_input`, the identity by default, is tensor parallelism's f: every
normed hidden state passes it once before the column-parallel matmuls that read it (wq/wk/wv, w1/w3, head).

Shapes: B rows, T positions, H query heads, KV key/value heads, R = H // KV, D head_dim, V vocab.
"""

from __future__ import annotations

import functools

import numpy as np

from codefill.model.llama import Transformer, apply_rotary

from .lora import PROJECTION_PATHS
from .train_config import LoraConfig

IGNORE_INDEX = -100


@functools.cache
def _cells():
    import mindspore as ms
    from mindspore import Tensor, nn, ops

    class Plain(nn.Cell):
        """A frozen-or-trained projection with the adapter's call signature."""

        def __init__(self, base):
            super().__init__(auto_prefix=False)
            self.base = base

        def construct(self, x, seed):
            return self.base(x)

    class Identity(nn.Cell):
        def construct(self, x):
            return x

    class Block(nn.Cell):
        def __init__(self, layer, projections: dict, cfg, replicated_input):
            super().__init__(auto_prefix=False)
            self.attention_norm, self.ffn_norm = layer.attention_norm, layer.ffn_norm
            self.wq, self.wk, self.wv, self.wo = (projections[k] for k in ("wq", "wk", "wv", "wo"))
            self.w1, self.w2, self.w3 = (projections[k] for k in ("w1", "w2", "w3"))
            attn = layer.attention  # a tensor-parallel shard has H/N and KV/N heads here; R and D are unchanged
            self.n_heads, self.n_kv_heads = attn.n_heads, attn.n_kv_heads
            self.head_dim, self.n_rep = cfg.head_dim, cfg.n_rep
            self.scale = 1.0 / float(np.sqrt(cfg.head_dim))
            self.replicated_input = replicated_input

        def construct(self, x, cos, sin, mask, seed):
            b, t = x.shape[0], x.shape[1]
            h = self.replicated_input(self.attention_norm(x))
            q = self.wq(h, seed).reshape(b, t, self.n_heads, self.head_dim)
            k = self.wk(h, seed).reshape(b, t, self.n_kv_heads, self.head_dim)
            v = self.wv(h, seed).reshape(b, t, self.n_kv_heads, self.head_dim)
            q = apply_rotary(q, cos, sin) * self.scale
            k = apply_rotary(k, cos, sin)
            if self.n_rep > 1:  # query head h = kv * R + r reads kv head h // R (Hugging Face's repeat_kv)
                k = ops.tile(k.expand_dims(3), (1, 1, 1, self.n_rep, 1)).reshape(b, t, self.n_heads, self.head_dim)
                v = ops.tile(v.expand_dims(3), (1, 1, 1, self.n_rep, 1)).reshape(b, t, self.n_heads, self.head_dim)
            q, k, v = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, H, T, D]
            scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) + mask  # [B, H, T, T]
            out = ops.matmul(ops.softmax(scores, -1), v).transpose(0, 2, 1, 3)  # [B, T, H, D]
            x = x + self.wo(out.reshape(b, t, self.n_heads * self.head_dim), seed)
            h = self.replicated_input(self.ffn_norm(x))
            return x + self.w2(ops.silu(self.w1(h, seed)) * self.w3(h, seed), seed)

    class LanguageModelLoss(nn.Cell):
        """(tokens [B, T], labels [B, T], seed) -> summed cross-entropy over labels != IGNORE_INDEX (a scalar).

        A sum, not a mean: the trainer divides by the labelled-token count of the whole global batch."""

        def __init__(self, model: Transformer, lora: LoraConfig | None, adapters: dict[str, np.ndarray] | None,
                     replicated_input):
            super().__init__(auto_prefix=False)
            from .lora import lora_cell_class

            cfg = model.config
            self.replicated_input = replicated_input if replicated_input is not None else Identity()
            self.model_embed, self.norm, self.output = model.tok_embeddings, model.norm, model.output
            self.rope_cos, self.rope_sin = model.rope_cos, model.rope_sin
            blocks = []
            LoraLinear = lora_cell_class() if lora is not None else None
            for i, layer in enumerate(model.layers):
                projections = {}
                for key, base in (("wq", layer.attention.wq), ("wk", layer.attention.wk),
                                  ("wv", layer.attention.wv), ("wo", layer.attention.wo),
                                  ("w1", layer.feed_forward.w1), ("w2", layer.feed_forward.w2),
                                  ("w3", layer.feed_forward.w3)):
                    path = f"layers.{i}.{PROJECTION_PATHS[key]}"
                    if lora is not None and key in lora.targets:
                        projections[key] = LoraLinear(base, path, adapters[path + ".lora_a"],
                                                      adapters[path + ".lora_b"], lora.scale, lora.dropout,
                                                      salt=i * 7 + "wq wk wv wo w1 w2 w3".split().index(key) + 1)
                    else:
                        projections[key] = Plain(base)
                blocks.append(Block(layer, projections, cfg, self.replicated_input))
            self.blocks = nn.CellList(blocks, auto_prefix=False)
            self.vocab_size = cfg.vocab_size

        def logits(self, tokens, seed):
            b, t = tokens.shape[0], tokens.shape[1]
            x = self.model_embed(tokens)  # [B, T, dim]
            cos = self.rope_cos[:t].reshape(1, t, 1, -1)
            sin = self.rope_sin[:t].reshape(1, t, 1, -1)
            row = ops.arange(0, t, dtype=ms.int32)
            visible = row.reshape(1, -1) <= row.reshape(-1, 1)  # [T, T]: key j visible to query i iff j <= i
            zeros = ops.zeros((t, t), ms.float32)
            mask = ops.select(visible, zeros, zeros - 1e30).reshape(1, 1, t, t)
            for block in self.blocks:
                x = block(x, cos, sin, mask, seed)
            return self.output(self.replicated_input(self.norm(x)))  # [B, T, V]

        def construct(self, tokens, labels, seed):
            logits = self.logits(tokens, seed).reshape(-1, self.vocab_size)  # [B*T, V]
            labels = labels.reshape(-1)
            valid = labels != IGNORE_INDEX
            target = ops.select(valid, labels, ops.zeros_like(labels))
            logp = ops.log_softmax(logits, -1)
            picked = ops.gather_elements(logp, 1, target.reshape(-1, 1)).reshape(-1)  # [B*T]
            return -(picked * valid.astype(ms.float32)).sum()

    return LanguageModelLoss


def language_model_loss(model: Transformer, lora: LoraConfig | None = None,
                        adapters: dict[str, np.ndarray] | None = None, replicated_input=None):
    """The loss Cell over `model`'s own parameters (plus LoRA adapters when `lora` is given).
    `replicated_input`: tp_train.shard_for_training's f Cell for a tensor-parallel shard, else None."""
    return _cells()(model, lora, adapters, replicated_input)


def shifted(rows_ids: np.ndarray, rows_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Data rows [B, L+1] -> (inputs ids[:, :-1], targets labels[:, 1:]), both [B, L] int32."""
    return (np.ascontiguousarray(rows_ids[:, :-1], np.int32), np.ascontiguousarray(rows_labels[:, 1:], np.int32))
