"""The Llama / Code Llama architecture as one dataclass, with named presets.

Only architecture lives here. How a model is run (cache sizes, batch, tensor parallelism) and how tokens are
sampled are separate configs owned by the code that runs and samples.

A config is read from a Hugging Face `config.json` (`LlamaConfig.from_hf`) or taken from `PRESETS` by name.
Anything in a Hugging Face config that this implementation does not compute (rope scaling, biases, another
activation, tied embeddings) is refused with a `ConfigError` naming the key and value, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codefill.errors import CodefillError


class ConfigError(CodefillError, ValueError):
    """A model config that codefill cannot run; the message names the offending key and value."""


@dataclass(frozen=True)
class LlamaConfig:
    dim: int  # hidden size
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads; < n_heads is grouped-query attention
    vocab_size: int
    ffn_dim: int  # SwiGLU inner size
    norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0  # Code Llama uses 1e6; Llama 2 used 1e4
    max_seq_len: int = 16384  # positions the model was trained for

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ConfigError(f"norm_eps {self.norm_eps} and rope_theta {self.rope_theta} must be positive")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head."""
        return self.n_heads // self.n_kv_heads

    def n_params(self) -> int:
        kv = self.n_kv_heads * self.head_dim
        per_layer = 2 * self.dim * self.dim + 2 * self.dim * kv + 3 * self.dim * self.ffn_dim + 2 * self.dim
        return self.n_layers * per_layer + 2 * self.vocab_size * self.dim + self.dim

    # --- Hugging Face config.json -------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Build from the dict of a Hugging Face Llama `config.json`, refusing what we do not implement."""
        model_type = hf.get("model_type")
        if model_type != "llama":
            raise ConfigError(f"model_type must be 'llama', got {model_type!r}")
        refused = {
            "rope_scaling": (None,),
            "attention_bias": (False, None),
            "mlp_bias": (False, None),
            "tie_word_embeddings": (False, None),
            "hidden_act": ("silu", None),
        }
        for key, allowed in refused.items():
            if hf.get(key) not in allowed:
                raise ConfigError(f"unsupported {key}={hf.get(key)!r} (supported: {allowed[0]!r})")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
            if key not in hf:
                raise ConfigError(f"config.json has no {key!r}")
        rope_theta = _hf_rope_theta(hf)
        cfg = cls(
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            vocab_size=hf["vocab_size"],
            ffn_dim=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_seq_len=hf.get("max_position_embeddings", 2048),
        )
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim != cfg.head_dim:
            raise ConfigError(f"head_dim {head_dim} != hidden_size/num_attention_heads = {cfg.head_dim}")
        return cfg

    def to_hf(self, *, bos_id: int | None = None, eos_id: int | None = None, torch_dtype: str = "float32") -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "intermediate_size": self.ffn_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "hidden_act": "silu",
            "rope_scaling": None,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,  # the key transformers 5 reads; 4.x reads torch_dtype
        }

    # --- codefill's own files --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}")
        missing = sorted(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in d)
        if missing:
            raise ConfigError(f"config is missing keys {missing}")
        return cls(**d)

    @classmethod
    def from_hf_file(cls, path: str | Path) -> "LlamaConfig":
        try:
            return cls.from_hf(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read Hugging Face config {path}: {e}") from e


def _hf_rope_theta(hf: dict[str, Any]) -> float:
    """rope_theta from a Hugging Face config: top-level (transformers 4) or in `rope_parameters`
    (transformers 5, which writes {"rope_theta": ..., "rope_type": "default"} and no top-level key)."""
    params = hf.get("rope_parameters")
    if params is None:
        return float(hf.get("rope_theta", 10000.0))
    if not isinstance(params, dict) or params.get("rope_type", "default") != "default":
        raise ConfigError(f"unsupported rope_parameters={params!r} (supported: rope_type 'default')")
    extra = sorted(set(params) - {"rope_theta", "rope_type"})
    if extra:
        raise ConfigError(f"unsupported rope_parameters keys {extra} in {params!r}")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if "rope_theta" in hf and float(hf["rope_theta"]) != theta:
        raise ConfigError(f"rope_theta {hf['rope_theta']!r} disagrees with rope_parameters {params!r}")
    return theta


def _codellama(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, ffn_dim: int, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim,
                       vocab_size=vocab_size, norm_eps=1e-5, rope_theta=1e6, max_seq_len=16384)


# The real checkpoints. 7B/13B base and Instruct add four infilling pieces to Llama's 32000 (vocab 32016);
# the Python variants and every 34B model were trained without infilling and keep 32000.
PRESETS: dict[str, LlamaConfig] = {
    "codellama-7b": _codellama(4096, 32, 32, 32, 11008, 32016),
    "codellama-7b-python": _codellama(4096, 32, 32, 32, 11008, 32000),
    "codellama-7b-instruct": _codellama(4096, 32, 32, 32, 11008, 32016),
    "codellama-13b": _codellama(5120, 40, 40, 40, 13824, 32016),
    "codellama-13b-python": _codellama(5120, 40, 40, 40, 13824, 32000),
    "codellama-13b-instruct": _codellama(5120, 40, 40, 40, 13824, 32016),
    "codellama-34b": _codellama(8192, 48, 64, 8, 22016, 32000),
    "codellama-34b-python": _codellama(8192, 48, 64, 8, 22016, 32000),
    "codellama-34b-instruct": _codellama(8192, 48, 64, 8, 22016, 32000),
    # Small shapes for tests and benchmarks on CPU. Tiny presets take their vocab_size from the tokenizer
    # they are built with (dataclasses.replace), so the number here is only a default.
    "tiny-test": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=172, vocab_size=512,
                             rope_theta=1e6, max_seq_len=2048),
    "tiny-gqa": LlamaConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=172, vocab_size=512,
                            rope_theta=1e6, max_seq_len=2048),
    "small": LlamaConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536, vocab_size=32016,
                         rope_theta=1e6, max_seq_len=4096),
}


def preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
