"""LlamaConfig: presets match the real Code Llama checkpoints; Hugging Face configs round trip; bad ones fail."""

import dataclasses

import pytest

from codefill.model.config import PRESETS, ConfigError, LlamaConfig, preset
from codefill.model.weights import expected_shapes, hf_name_map


@pytest.mark.parametrize("name,dim,layers,heads,kv,ffn,vocab", [
    ("codellama-7b", 4096, 32, 32, 32, 11008, 32016),
    ("codellama-7b-python", 4096, 32, 32, 32, 11008, 32000),
    ("codellama-13b", 5120, 40, 40, 40, 13824, 32016),
    ("codellama-13b-instruct", 5120, 40, 40, 40, 13824, 32016),
    ("codellama-34b", 8192, 48, 64, 8, 22016, 32000),
])
def test_presets_match_published_checkpoints(name, dim, layers, heads, kv, ffn, vocab):
    c = preset(name)
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == (dim, layers, heads, kv, ffn, vocab)
    assert c.rope_theta == 1e6 and c.max_seq_len == 16384 and c.head_dim == 128


def test_7b_parameter_count_is_6_7_billion():
    assert 6.7e9 < preset("codellama-7b").n_params() < 6.8e9
    assert 33.7e9 < preset("codellama-34b").n_params() < 33.8e9


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_round_trip(name):
    c = PRESETS[name]
    assert LlamaConfig.from_hf(c.to_hf()) == c
    assert LlamaConfig.from_dict(c.to_dict()) == c


def test_real_hf_config_is_read():
    # The fields of codellama/CodeLlama-7b-hf's config.json that matter.
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
          "intermediate_size": 11008, "max_position_embeddings": 16384, "num_attention_heads": 32,
          "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_scaling": None,
          "rope_theta": 1000000, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32016,
          "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
    assert LlamaConfig.from_hf(hf) == preset("codellama-7b")


@pytest.mark.parametrize("key,value,needle", [
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope_scaling"),
    ("attention_bias", True, "attention_bias"),
    ("mlp_bias", True, "mlp_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("model_type", "mistral", "model_type"),
    ("num_key_value_heads", 3, "n_kv_heads"),
    ("head_dim", 64, "head_dim"),
])
def test_unsupported_hf_configs_are_refused_with_the_value(key, value, needle):
    hf = preset("tiny-test").to_hf()
    hf[key] = value
    with pytest.raises(ConfigError, match=needle):
        LlamaConfig.from_hf(hf)


def test_invalid_shapes_are_refused():
    with pytest.raises(ConfigError, match="dim 65"):
        dataclasses.replace(preset("tiny-test"), dim=65)
    with pytest.raises(ConfigError, match="n_layers"):
        dataclasses.replace(preset("tiny-test"), n_layers=0)
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        preset("nope")
    with pytest.raises(ConfigError, match="unknown config keys"):
        LlamaConfig.from_dict({**preset("tiny-test").to_dict(), "bogus": 1})


def test_weight_names_are_complete_and_map_one_to_one():
    c = preset("tiny-gqa")
    shapes = expected_shapes(c)
    assert len(shapes) == 3 + 9 * c.n_layers
    assert shapes["layers.1.attention.wk.weight"] == (c.n_kv_heads * c.head_dim, c.dim)
    names = hf_name_map(c)
    assert set(names) == set(shapes) and len(set(names.values())) == len(names)
