"""Names and shapes of every tensor in a codefill model, and the one explicit map to Hugging Face names.

codefill names follow Meta's llama reference (`layers.3.attention.wq.weight`); layouts follow Hugging Face:
linear weights are [out_features, in_features] and the rotary embedding uses the half-split layout
(`rotate_half`), so Hugging Face q/k projections load unchanged, without Meta's interleave permutation.

Qwen2's q/k/v biases (`attention_bias`) are `layers.3.attention.wq.bias` beside the weights. A model with tied
embeddings (`tie_word_embeddings`) still has its own `output.weight`, equal to `tok_embeddings.weight`:
conversion copies it in and checks the tie on the way out (convert.py), so the model and its TP layout
(a replicated embedding, a vocab-parallel head) are the same for every family.
"""

from __future__ import annotations

from .config import LlamaConfig


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a model of this config has, by codefill name, in a stable order."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (cfg.dim,)
        shapes[p + "attention.wq.weight"] = (q, cfg.dim)
        shapes[p + "attention.wk.weight"] = (kv, cfg.dim)
        shapes[p + "attention.wv.weight"] = (kv, cfg.dim)
        shapes[p + "attention.wo.weight"] = (cfg.dim, q)
        if cfg.attention_bias:
            shapes[p + "attention.wq.bias"] = (q,)
            shapes[p + "attention.wk.bias"] = (kv,)
            shapes[p + "attention.wv.bias"] = (kv,)
        shapes[p + "ffn_norm.weight"] = (cfg.dim,)
        shapes[p + "feed_forward.w1.weight"] = (cfg.ffn_dim, cfg.dim)  # gate
        shapes[p + "feed_forward.w2.weight"] = (cfg.dim, cfg.ffn_dim)  # down
        shapes[p + "feed_forward.w3.weight"] = (cfg.ffn_dim, cfg.dim)  # up
    shapes["norm.weight"] = (cfg.dim,)
    shapes["output.weight"] = (cfg.vocab_size, cfg.dim)
    return shapes


# Per-layer names: codefill suffix -> Hugging Face suffix.
_LAYER_MAP = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
_GLOBAL_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name_map(cfg: LlamaConfig) -> dict[str, str]:
    """codefill name -> Hugging Face name, for every tensor of this config (a bijection)."""
    shapes = expected_shapes(cfg)
    names = {}
    for ours in shapes:
        if ours.startswith("layers."):
            _, i, suffix = ours.split(".", 2)
            names[ours] = f"model.layers.{i}.{_LAYER_MAP[suffix]}"
        else:
            names[ours] = _GLOBAL_MAP[ours]
    return names
