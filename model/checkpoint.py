"""codefill's own model directory (MODEL_DIR): what workers load and what `codefill convert` writes.

    MODEL_DIR/
      config.json        {"format": "codefill-model", "version": 1, "architecture": LlamaConfig.to_dict(),
                          "dtype": "float32" | "float16" | "bfloat16", "note": optional free text}
      model.safetensors  every tensor of weights.expected_shapes(config), codefill names, one stored dtype
      tokenizer.model    Code Llama: the SentencePiece model; its vocabulary size equals the architecture's
      tokenizer.json     byte-level BPE families (Qwen2.5-Coder, DeepSeek-Coder): the Hugging Face file; its
                         ids fit in the architecture's vocabulary, which checkpoints pad (Qwen 151665 -> 151936)
      (the architecture's `family` says which: families.py)

Loading is strict: an unknown format or version, a missing, extra or mis-shaped tensor, a dtype other than
the declared one, or a vocabulary size that disagrees between config, tokenizer and embedding is a
`CheckpointError` naming the file and the values. Writing is atomic: files go into a temporary sibling
directory, are fsynced, and the directory is renamed into place, so a crash or an error never leaves a
partial MODEL_DIR behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codefill.errors import CodefillError

from .config import ConfigError, LlamaConfig
from .safetensors_io import DTYPE_NAMES, SafetensorsError, dtype_name, from_float32, read_safetensors, \
    to_float32, write_safetensors
from .bpe_tokenizer import BpeTokenizer
from .families import FAMILIES
from .tokenizer import Tokenizer, TokenizerError  # SentencePiece itself is imported only when one is opened
from .weights import expected_shapes

FORMAT = "codefill-model"
VERSION = 1
CONFIG_NAME, WEIGHTS_NAME, TOKENIZER_NAME = "config.json", "model.safetensors", "tokenizer.model"
_CONFIG_KEYS = {"format", "version", "architecture", "dtype", "note"}


class CheckpointError(CodefillError, ValueError):
    """A model directory or checkpoint that cannot be read or written as asked; names file and values."""


@dataclass(frozen=True)
class ModelFiles:
    config: LlamaConfig
    weights: dict[str, np.ndarray]  # codefill name -> array, in expected_shapes order
    tokenizer_path: Path
    stored_dtype: str = "float32"  # the dtype in model.safetensors, whatever `weights` were converted to
    note: str | None = None

    def tokenizer(self) -> Tokenizer | BpeTokenizer:
        return open_tokenizer(self.config, self.tokenizer_path)


def tokenizer_name(config: LlamaConfig) -> str:
    """The tokenizer file of a MODEL_DIR of this family: tokenizer.model or tokenizer.json."""
    return FAMILIES[config.family].tokenizer_file


def open_tokenizer(config: LlamaConfig, path: str | Path) -> Tokenizer | BpeTokenizer:
    """The family's tokenizer from its file (TokenizerError if it cannot be read)."""
    family = FAMILIES[config.family]
    if family.tokenizer_file == TOKENIZER_NAME:
        return Tokenizer(path)
    return BpeTokenizer(path, family, config.vocab_size)  # ids past the file's tokens: padding rows


# --- checks shared with convert.py ----------------------------------------------------------------------


def check_weights(config: LlamaConfig, weights: Mapping[str, np.ndarray], where: str) -> str:
    """Raise unless `weights` are exactly the tensors of `config`, all of one supported dtype; return it."""
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in weights]
    extra = sorted(n for n in weights if n not in expected)
    if missing or extra:
        raise CheckpointError(f"{where}: missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                              f"unexpected tensors {extra[:8]}{'...' if len(extra) > 8 else ''}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(weights[name].shape)}, "
                                  f"expected {shape} for {config}")
    dtypes = {np.dtype(w.dtype) for w in weights.values()}
    try:
        names = sorted({dtype_name(d) for d in dtypes})
    except SafetensorsError as e:
        raise CheckpointError(f"{where}: {e}") from e
    if len(names) != 1:
        first = {d: next(n for n, w in weights.items() if w.dtype == d) for d in dtypes}
        raise CheckpointError(f"{where}: tensors mix dtypes {names} (e.g. {sorted(first.values())})")
    return names[0]


def check_vocab(config: LlamaConfig, tokenizer_path: Path, where: str) -> None:
    """SentencePiece: as many pieces as the vocabulary; byte-level BPE: ids within it (checkpoints pad it)."""
    try:
        tok = open_tokenizer(config, tokenizer_path)
    except TokenizerError as e:
        raise CheckpointError(f"{where}: {e}") from e
    n = tok.n_tokens if isinstance(tok, BpeTokenizer) else tok.vocab_size
    if n != config.vocab_size and not (isinstance(tok, BpeTokenizer) and n <= config.vocab_size):
        raise CheckpointError(f"{where}: tokenizer {tokenizer_path} has {n} pieces but the config's "
                              f"vocab_size is {config.vocab_size}")


# --- atomic directories ---------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_synced(path: Path, obj: object) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _copy_synced(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out_dir` to fill; on success it becomes `out_dir`, on error it is removed.

    An existing non-empty `out_dir` is refused before anything is written unless `overwrite`; then the old
    directory is swapped out only after the new one is complete."""
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir} exists and is not empty (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); a model directory is meant to be shared
    try:
        yield tmp
        _fsync_dir(tmp)
        if out_dir.is_dir() and any(out_dir.iterdir()):
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
            os.rename(out_dir, old / "d")
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)  # POSIX rename replaces an empty directory
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- save / load ----------------------------------------------------------------------------------------


def save_model_dir(path: str | Path, config: LlamaConfig, weights: Mapping[str, np.ndarray],
                   tokenizer_path: str | Path, *, note: str | None = None, overwrite: bool = False,
                   on_written: Callable[[str, int], None] | None = None) -> Path:
    """Write a MODEL_DIR atomically. Weights keep their dtype (float32, float16 or BFLOAT16, all the same).
    `on_written`: write_safetensors' per-tensor hook."""
    path, tokenizer_path = Path(path), Path(tokenizer_path)
    stored = check_weights(config, weights, f"weights for {path}")
    check_vocab(config, tokenizer_path, f"saving {path}")
    meta = {"format": FORMAT, "version": VERSION, "architecture": config.to_dict(), "dtype": stored}
    if note is not None:
        meta["note"] = str(note)
    with atomic_directory(path, overwrite) as tmp:
        ordered = {name: weights[name] for name in expected_shapes(config)}
        try:
            write_safetensors(tmp / WEIGHTS_NAME, ordered, {"format": FORMAT}, on_written=on_written)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from e
        _copy_synced(tokenizer_path, tmp / tokenizer_name(config))
        write_json_synced(tmp / CONFIG_NAME, meta)
    return path


def read_model_config(path: str | Path) -> tuple[LlamaConfig, str, str | None]:
    """(architecture, stored dtype name, note) from a MODEL_DIR's config.json, strictly validated."""
    cfg_path = Path(path) / CONFIG_NAME
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {cfg_path}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else meta
        hint = " (a Hugging Face checkpoint? run `codefill convert`)" if isinstance(meta, dict) and "model_type" in meta else ""
        raise CheckpointError(f"{cfg_path}: format is {got!r}, expected {FORMAT!r}{hint}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{cfg_path}: version {meta.get('version')!r} is not supported (expected {VERSION})")
    unknown = sorted(set(meta) - _CONFIG_KEYS)
    if unknown:
        raise CheckpointError(f"{cfg_path}: unknown keys {unknown}")
    if meta.get("dtype") not in DTYPE_NAMES:
        raise CheckpointError(f"{cfg_path}: dtype {meta.get('dtype')!r} is not one of {list(DTYPE_NAMES)}")
    try:
        config = LlamaConfig.from_dict(meta.get("architecture") or {})
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: architecture: {e}") from e
    return config, meta["dtype"], meta.get("note")


def model_dir_tokenizer_path(path: str | Path) -> Path:
    """A MODEL_DIR's tokenizer, checked against its config, without reading the weights (for the LSP side,
    which tokenizes but never runs the model)."""
    path = Path(path)
    config, _, _ = read_model_config(path)
    tokenizer_path = path / tokenizer_name(config)
    check_vocab(config, tokenizer_path, str(path))
    return tokenizer_path


def load_tokenizer(path: str | Path) -> Tokenizer | BpeTokenizer:
    """A MODEL_DIR's tokenizer, the one its family names, checked against its config."""
    config, _, _ = read_model_config(path)
    return open_tokenizer(config, model_dir_tokenizer_path(path))


def load_model_dir(path: str | Path, dtype: type | np.dtype | None = np.float32, *,
                   vocab_check: bool = True) -> ModelFiles:
    """Read and check a MODEL_DIR. Weights are converted to `dtype` (float32 or float16); dtype=None keeps
    the stored dtype (BFLOAT16 arrays for bfloat16) as read-only memory maps, for bit-exact round trips.
    vocab_check=False skips loading the tokenizer (the PyTorch trainer, on a machine without SentencePiece)."""
    path = Path(path)
    config, stored, note = read_model_config(path)
    tokenizer_path = path / tokenizer_name(config)
    if vocab_check:
        check_vocab(config, tokenizer_path, str(path))
    try:
        raw = read_safetensors(path / WEIGHTS_NAME)
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from e
    actual = check_weights(config, raw, str(path / WEIGHTS_NAME))
    if actual != stored:
        raise CheckpointError(f"{path / CONFIG_NAME} declares dtype {stored!r} but {WEIGHTS_NAME} holds {actual!r}")
    names = expected_shapes(config)
    if dtype is None:
        weights = {n: raw[n] for n in names}
    elif np.dtype(dtype) in (np.float32, np.float16):
        weights = {n: from_float32(to_float32(raw[n]), np.dtype(dtype)) if raw[n].dtype != dtype
                   else np.array(raw[n]) for n in names}
    else:
        raise CheckpointError(f"cannot load {path} as {dtype}; use float32, float16 or None (stored)")
    return ModelFiles(config, weights, tokenizer_path, stored, note)
