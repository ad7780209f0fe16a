"""The Llama / Code Llama architecture as one dataclass, with named presets; Qwen2 and DeepSeek-Coder are
the same architecture with three switches (q/k/v biases, tied embeddings, linear rope scaling).

Only architecture lives here. How a model is run (cache sizes, batch, tensor parallelism) and how tokens are
sampled are separate configs owned by the code that runs and samples.

A config is read from a Hugging Face `config.json` (`LlamaConfig.from_hf`) or taken from `PRESETS` by name.
Two Hugging Face model types are read: `llama` (Code Llama, DeepSeek-Coder) and `qwen2` (Qwen2.5-Coder).
Anything in them that this implementation does not compute (a rope scaling other than linear, a sliding
window, another activation, Llama's attention or MLP biases) is refused with a `ConfigError` naming the key
and value, never silently ignored.

`family` is not math: it names the tokenizer and fill-in-the-middle format the weights were trained with
(model/families.py), recorded with the architecture so that every reader of a MODEL_DIR (language server,
HTTP server, workers' stop-rule table, training) picks the same ones.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codefill.errors import CodefillError

from .families import FAMILIES


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
    # Linear rope scaling (position interpolation): rotary angles use position / factor. DeepSeek-Coder: 4.
    rope_scaling_factor: float = 1.0
    attention_bias: bool = False  # biases on q/k/v (Qwen2); wo and the FFN never have one
    # The head reuses the embedding matrix (Qwen2.5-Coder 0.5B-3B). A MODEL_DIR stores both tensors (the math
    # and the TP layout stay one); conversion back to Hugging Face writes the tie when they are equal.
    tie_word_embeddings: bool = False
    family: str = "codellama"  # tokenizer and FIM format: a key of families.FAMILIES

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
        if not (isinstance(self.rope_scaling_factor, (int, float)) and self.rope_scaling_factor >= 1.0):
            raise ConfigError(f"rope_scaling_factor must be a number >= 1, got {self.rope_scaling_factor!r}")
        for name in ("attention_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown family {self.family!r}; known: {', '.join(FAMILIES)}")

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
        if self.attention_bias:
            per_layer += self.dim + 2 * kv
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        return self.n_layers * per_layer + self.vocab_size * self.dim + head + self.dim

    # --- Hugging Face config.json -------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any], family: str | None = None) -> "LlamaConfig":
        """Build from the dict of a Hugging Face `config.json` (model_type llama or qwen2), refusing what we do
        not implement. `family` defaults to the model type's first family (llama: codellama, qwen2:
        qwen2.5-coder); convert.py passes the one the checkpoint's tokenizer shows."""
        model_type = hf.get("model_type")
        if model_type not in _HF_REFUSED:
            raise ConfigError(f"model_type must be one of {sorted(_HF_REFUSED)}, got {model_type!r}")
        for key, allowed in _HF_REFUSED[model_type].items():
            if hf.get(key) not in allowed:
                raise ConfigError(f"unsupported {key}={hf.get(key)!r} (supported: {allowed[0]!r})")
        layer_types = hf.get("layer_types")
        if layer_types is not None and set(layer_types) != {"full_attention"}:
            raise ConfigError(f"unsupported layer_types={layer_types!r} (supported: all 'full_attention')")
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
            if key not in hf:
                raise ConfigError(f"config.json has no {key!r}")
        rope_theta, rope_factor = _hf_rope(hf)
        if family is None:
            family = next(name for name, f in FAMILIES.items() if f.hf_model_type == model_type)
        elif FAMILIES.get(family) is None or FAMILIES[family].hf_model_type != model_type:
            raise ConfigError(f"family {family!r} is not a {model_type!r} family "
                              f"(those are {[n for n, f in FAMILIES.items() if f.hf_model_type == model_type]})")
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
            rope_scaling_factor=rope_factor,
            attention_bias=model_type == "qwen2",  # Qwen2Attention always has q/k/v biases; no key says so
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),  # transformers' default: untied
            family=family,
        )
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim != cfg.head_dim:
            raise ConfigError(f"head_dim {head_dim} != hidden_size/num_attention_heads = {cfg.head_dim}")
        return cfg

    def to_hf(self, *, bos_id: int | None = None, eos_id: int | None = None, torch_dtype: str = "float32",
              tie_word_embeddings: bool | None = None) -> dict:
        """A Hugging Face config.json dict (Qwen2ForCausalLM when attention_bias, else LlamaForCausalLM).
        `tie_word_embeddings`: what the written weights do (default: the config's)."""
        rope_scaling = None if self.rope_scaling_factor == 1.0 else {"type": "linear", "rope_type": "linear",
                                                                     "factor": float(self.rope_scaling_factor)}
        out = {
            "architectures": ["Qwen2ForCausalLM" if self.attention_bias else "LlamaForCausalLM"],
            "model_type": "qwen2" if self.attention_bias else "llama",
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
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,  # the key transformers 5 reads; 4.x reads torch_dtype
        }
        if self.attention_bias:
            out.update(use_sliding_window=False, sliding_window=None)
        else:
            out.update(attention_bias=False, mlp_bias=False)
        return out

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


# Per Hugging Face model type, the keys whose other values codefill does not compute (first value: the one
# supported). Qwen2's q/k/v biases are not a key; a Llama `attention_bias` would also put one on o_proj.
_HF_REFUSED: dict[str, dict[str, tuple]] = {
    "llama": {"attention_bias": (False, None), "mlp_bias": (False, None), "hidden_act": ("silu", None)},
    "qwen2": {"use_sliding_window": (False, None), "hidden_act": ("silu", None)},
}


def _hf_rope(hf: dict[str, Any]) -> tuple[float, float]:
    """(rope_theta, linear scaling factor) from a Hugging Face config. transformers 4 and the published
    checkpoints write a top-level `rope_theta` and `rope_scaling` ({"type": "linear", "factor": 4.0} or null);
    transformers 5 writes `rope_parameters` ({"rope_theta": ..., "rope_type": "default" | "linear", ...})."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"unsupported rope_parameters={params!r} (supported: a dict)")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"unsupported rope_scaling={scaling!r} (supported: null or linear)")
    theta = float(hf.get("rope_theta", (params or {}).get("rope_theta", 10000.0)))
    if params is not None and float(params.get("rope_theta", theta)) != theta:
        raise ConfigError(f"rope_theta {hf['rope_theta']!r} disagrees with rope_parameters {params!r}")
    factor = 1.0
    for key, d in (("rope_scaling", scaling), ("rope_parameters", params)):
        if d is None:
            continue
        kind = d.get("rope_type", d.get("type", "default"))
        if d.get("type", kind) != kind:
            raise ConfigError(f"unsupported {key}={d!r}: type and rope_type disagree")
        extra = sorted(set(d) - {"rope_theta", "rope_type", "type", "factor"})
        if kind not in ("default", "linear") or extra:
            raise ConfigError(f"unsupported {key}={d!r} (supported: rope type 'default' or 'linear' with a factor)")
        if kind == "linear":
            f = d.get("factor")
            if not isinstance(f, (int, float)) or isinstance(f, bool) or f < 1:
                raise ConfigError(f"unsupported {key}={d!r}: a linear factor must be a number >= 1")
            if factor != 1.0 and float(f) != factor:
                raise ConfigError(f"rope_scaling factor {factor} disagrees with {key}={d!r}")
            factor = float(f)
        elif "factor" in d:
            raise ConfigError(f"unsupported {key}={d!r}: a factor without rope type 'linear'")
    return theta, factor


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
