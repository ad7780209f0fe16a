"""Convert between Hugging Face checkpoints (Code Llama, DeepSeek-Coder, Qwen2.5-Coder) and codefill
MODEL_DIRs, losslessly.

One explicit name map (`weights.hf_name_map`) and a shape check per tensor: a tensor the map does not know,
one it expects but cannot find, or one of the wrong shape is a `CheckpointError` naming it, raised before
anything is written. Weights keep their dtype (float32, float16, bfloat16), so codefill -> HF -> codefill
reproduces every bit. Layouts need no transposes or permutations: codefill uses Hugging Face's [out, in]
linear weights and half-split rotary layout (see weights.py).

The family (model/families.py: tokenizer and FIM format) comes from the checkpoint: `model_type` qwen2 is
Qwen2.5-Coder; a llama checkpoint with a `tokenizer.model` is Code Llama, one with only a `tokenizer.json`
holding DeepSeek-Coder's FIM tokens is DeepSeek-Coder; anything else is refused unless `family` is given.
Tied embeddings (Qwen2.5-Coder 0.5B-3B publish no `lm_head.weight`) become a copy in `output.weight`; on the
way back the head is left out again when it still equals the embedding (a full finetune unties them, and
then both are written with `tie_word_embeddings` false).

Hugging Face weights are read from `model.safetensors`, a sharded `model.safetensors.index.json`, or, only
through torch's `weights_only` unpickler (torch >= 2.6), from `pytorch_model.bin` files: a full pickle
load runs arbitrary code from the file.

Writing the weights shows a tqdm bar on stderr, advanced per tensor by its bytes, for a real checkpoint
(`MANY_TENSORS` or more) or when stderr is a terminal; `progress=True/False` forces it on or off.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .checkpoint import TOKENIZER_NAME, CheckpointError, _copy_synced, atomic_directory, check_weights, \
    load_model_dir, save_model_dir, tokenizer_name, write_json_synced
from .config import ConfigError, LlamaConfig
from .families import FAMILIES
from .safetensors_io import BFLOAT16, INDEX_NAME, SafetensorsError, read_checkpoint, write_safetensors
from .tokenizer import Tokenizer
from .weights import expected_shapes, hf_name_map

# Older transformers saved each layer's rotary inverse frequencies as a buffer. They are a function of
# rope_theta and head_dim that the model recomputes, so they are the one kind of tensor skipped on import.
_DERIVED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

_BIN_INDEX = "pytorch_model.bin.index.json"

MANY_TENSORS = 100  # Code Llama 7B has 291 tensors; the test models have a few dozen


@contextlib.contextmanager
def _write_bar(tensors: Mapping[str, np.ndarray], desc: str, progress: bool | None) -> Iterator:
    """A write_safetensors `on_written` hook that advances a progress bar (see the module docstring)."""
    if progress is None:
        progress = len(tensors) >= MANY_TENSORS or sys.stderr.isatty()
    with tqdm(total=sum(t.nbytes for t in tensors.values()), desc=desc, unit="B", unit_scale=True,
              unit_divisor=1024, disable=not progress) as bar:
        yield lambda name, nbytes: bar.update(nbytes)


def _torch_version(torch) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", torch.__version__).groups()
    return int(major), int(minor)


def _torch_to_numpy(t, where: str) -> np.ndarray:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view("<u2").view(BFLOAT16)  # the same 16 bits, tagged
    if t.dtype in (torch.float32, torch.float16):
        return t.numpy()
    raise CheckpointError(f"{where}: dtype {t.dtype} is not float32, float16 or bfloat16")


def _read_bin(hf_dir: Path) -> dict[str, np.ndarray]:
    index = hf_dir / _BIN_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read {index}: {e!r}") from e
        files = sorted(set(weight_map.values()))
        if any(Path(f).name != f for f in files):
            raise CheckpointError(f"{index}: shard names {files} must be files beside the index")
    else:
        weight_map, files = None, ["pytorch_model.bin"]
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"{hf_dir / files[0]} is a pickle; reading it needs torch >= 2.6, not installed. "
                              f"Convert it to safetensors, or install torch") from e
    if _torch_version(torch) < (2, 6):
        raise CheckpointError(
            f"refusing {hf_dir / files[0]}: torch {torch.__version__} cannot load .bin checkpoints safely "
            f"(its weights_only unpickler is incomplete before 2.6 and a full pickle load runs arbitrary "
            f"code from the file); upgrade torch to >= 2.6 or use a safetensors checkpoint")
    out: dict[str, np.ndarray] = {}
    for fname in files:
        path = hf_dir / fname
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, OSError...
            raise CheckpointError(f"cannot load {path} with weights_only=True: {e}") from e
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
            if weight_map is not None and weight_map.get(name) != fname:
                raise CheckpointError(f"{path}: tensor {name!r} is not assigned to this file by {index.name}")
            out[name] = _torch_to_numpy(t, f"{path}: tensor {name!r}")
    if weight_map is not None and set(weight_map) - set(out):
        raise CheckpointError(f"{index}: tensors {sorted(set(weight_map) - set(out))[:8]} are in no shard")
    return out


def read_hf_weights(hf_dir: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a Hugging Face checkpoint by HF name, in their stored dtype (safetensors preferred)."""
    hf_dir = Path(hf_dir)
    if (hf_dir / "model.safetensors").is_file() or (hf_dir / INDEX_NAME).is_file():
        try:
            return read_checkpoint(hf_dir)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from e
    if (hf_dir / "pytorch_model.bin").is_file() or (hf_dir / _BIN_INDEX).is_file():
        return _read_bin(hf_dir)
    raise CheckpointError(f"{hf_dir} has no model.safetensors, {INDEX_NAME}, pytorch_model.bin or {_BIN_INDEX}")


def checkpoint_family(hf_dir: str | Path) -> str:
    """The family of a Hugging Face checkpoint directory, from its model type and tokenizer (see the module
    docstring); CheckpointError naming what was found when it is none of them."""
    hf_dir = Path(hf_dir)
    try:
        model_type = json.loads((hf_dir / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"cannot read {hf_dir / 'config.json'}: {e}") from e
    for family in FAMILIES.values():
        path = hf_dir / family.tokenizer_file
        if family.hf_model_type != model_type or not path.is_file():
            continue
        if family.tokenizer_file == TOKENIZER_NAME or family.hf_model_type == "qwen2":
            return family.name
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e}") from e
        if all(json.dumps(t)[1:-1] in text or t in text for t in (family.prefix, family.suffix, family.middle)):
            return family.name
    files = sorted(p.name for p in hf_dir.glob("tokenizer*"))
    wanted = " or ".join(dict.fromkeys(f.tokenizer_file for f in FAMILIES.values() if f.hf_model_type == model_type))
    raise CheckpointError(f"{hf_dir}: no {wanted or 'tokenizer'} of a known family for model_type {model_type!r} "
                          f"(tokenizer files here: {files}; known: "
                          f"{', '.join(f'{n} ({f.hf_model_type}, {f.tokenizer_file})' for n, f in FAMILIES.items())}); "
                          f"pass the family explicitly if it is one of them")


def hf_to_model_dir(hf_dir: str | Path, out_dir: str | Path, *, family: str | None = None, overwrite: bool = False,
                    progress: bool | None = None) -> Path:
    """Convert a Hugging Face checkpoint directory (Code Llama, DeepSeek-Coder, Qwen2.5-Coder) into a MODEL_DIR."""
    hf_dir = Path(hf_dir)
    family = family or checkpoint_family(hf_dir)
    try:
        config = LlamaConfig.from_hf(_read_json(hf_dir / "config.json"), family=family)
    except ConfigError as e:
        raise CheckpointError(f"{hf_dir / 'config.json'}: {e}") from e
    tokenizer_path = hf_dir / tokenizer_name(config)
    if not tokenizer_path.is_file():
        raise CheckpointError(f"{hf_dir} has no {tokenizer_path.name} (the {family} tokenizer codefill reads)")
    hf = read_hf_weights(hf_dir)
    hf = {n: t for n, t in hf.items() if not _DERIVED.fullmatch(n)}
    names = hf_name_map(config)
    if config.tie_word_embeddings:
        head, embedding = names["output.weight"], names["tok_embeddings.weight"]
        if head in hf and not _same_bits(hf[head], hf.get(embedding)):
            raise CheckpointError(f"{hf_dir}: tie_word_embeddings is true but {head} differs from {embedding}")
        if embedding in hf:
            hf[head] = hf[embedding]  # the head is the embedding (weights.py keeps both)
    theirs_to_ours = {theirs: ours for ours, theirs in names.items()}
    missing = [theirs for theirs in names.values() if theirs not in hf]
    extra = sorted(n for n in hf if n not in theirs_to_ours)
    if missing or extra:
        raise CheckpointError(f"{hf_dir}: missing tensors {missing[:8]}, tensors codefill does not know {extra[:8]}")
    weights = {ours: hf[theirs] for ours, theirs in names.items()}
    check_weights(config, weights, str(hf_dir))  # shapes (named by codefill name) and one dtype
    with _write_bar(weights, f"writing {Path(out_dir).name}", progress) as on_written:
        return save_model_dir(out_dir, config, weights, tokenizer_path, overwrite=overwrite,
                              note=f"converted from the Hugging Face checkpoint {hf_dir.name}", on_written=on_written)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read Hugging Face config {path}: {e}") from e


def _same_bits(a: np.ndarray, b: np.ndarray | None) -> bool:
    return b is not None and a.shape == b.shape and a.dtype == b.dtype and np.array_equal(
        np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def _tokenizer_files(tok, max_len: int) -> dict[str, dict]:
    if not isinstance(tok, Tokenizer):  # tokenizer.json: transformers' fast tokenizer reads it as it is
        specials = {"bos_token": None if tok.family.hf_model_type == "qwen2" else tok.piece(tok.bos_id),
                    "eos_token": tok.piece(tok.eos_id)}
        return {"tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                                          "clean_up_tokenization_spaces": False, **specials}}
    # Enough for transformers' LlamaTokenizer(Fast) to load tokenizer.model with the same special pieces.
    specials = {"bos_token": tok.piece(tok.bos_id), "eos_token": tok.piece(tok.eos_id), "unk_token": tok.piece(0)}
    return {
        "tokenizer_config.json": {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                                  "add_eos_token": False, "legacy": False, "model_max_length": max_len,
                                  "clean_up_tokenization_spaces": False, **specials},
        "special_tokens_map.json": specials,
    }


def model_dir_to_hf(model_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                    progress: bool | None = None) -> Path:
    """Write a MODEL_DIR as a Hugging Face checkpoint (config.json, model.safetensors, tokenizer files)."""
    files = load_model_dir(model_dir, dtype=None)
    config = files.config
    tok = files.tokenizer()
    names = hf_name_map(config)
    weights = {names[n]: files.weights[n] for n in expected_shapes(config)}
    tied = config.tie_word_embeddings and _same_bits(files.weights["output.weight"],
                                                     files.weights["tok_embeddings.weight"])
    if tied:
        del weights[names["output.weight"]]  # as the published tied checkpoints: no lm_head.weight
    hf_config = config.to_hf(bos_id=tok.bos_id, eos_id=tok.eos_id, torch_dtype=files.stored_dtype,
                             tie_word_embeddings=tied)
    with atomic_directory(out_dir, overwrite) as tmp, _write_bar(weights, f"writing {Path(out_dir).name}",
                                                                 progress) as on_written:
        # transformers refuses a safetensors file whose metadata lacks format "pt".
        write_safetensors(tmp / "model.safetensors", weights, {"format": "pt"}, on_written=on_written)
        _copy_synced(files.tokenizer_path, tmp / tokenizer_name(config))
        for name, content in {"config.json": hf_config, **_tokenizer_files(tok, config.max_seq_len)}.items():
            write_json_synced(tmp / name, content)
    return Path(out_dir)
