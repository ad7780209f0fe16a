"""Read and write safetensors files as NumPy arrays, without torch.

The format: an 8-byte little-endian header length N, N bytes of JSON
`{"__metadata__": {str: str}, name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...}`,
then the raw little-endian tensor bytes; offsets are relative to the end of the header. Everything the
header claims is checked against the file (offsets in bounds, contiguous, sized for dtype x shape), so a
truncated or tampered file is a `SafetensorsError` naming the file and tensor, never garbage weights.

NumPy has no bfloat16. A bfloat16 tensor is kept as its raw 16-bit patterns in an array of dtype `BFLOAT16`
(a one-field structured dtype over "<u2"): the dtype itself is the tag, so round trips are bit-identical and
nothing can mistake the bits for integers or float16. `to_float32` widens it exactly (bf16 is the top half
of a float32).

Reading memory-maps the file; arrays returned are read-only views of it, so a 13 GB checkpoint is not
copied until something converts it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from codefill.errors import CodefillError

BFLOAT16 = np.dtype([("bfloat16", "<u2")])

# safetensors dtype string <-> NumPy dtype, for the dtypes Llama weights come in.
_DTYPES: dict[str, np.dtype] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": BFLOAT16}
_NAMES = {v: k for k, v in _DTYPES.items()}
# Names used in config files ("torch_dtype", our own "dtype").
DTYPE_NAMES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": BFLOAT16}

_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit; anything larger is not a header
INDEX_NAME = "model.safetensors.index.json"


class SafetensorsError(CodefillError, ValueError):
    """A safetensors file or index that is malformed or inconsistent; the message names file and tensor."""


def dtype_name(dtype: np.dtype) -> str:
    """"float32" / "float16" / "bfloat16" for a stored dtype."""
    for name, d in DTYPE_NAMES.items():
        if np.dtype(dtype) == d:
            return name
    raise SafetensorsError(f"unsupported dtype {dtype}; supported: {list(DTYPE_NAMES)}")


def to_float32(a: np.ndarray) -> np.ndarray:
    """A float32 copy of a float32/float16/bfloat16 array (exact for all three)."""
    if a.dtype == BFLOAT16:
        return (a.view("<u2").astype(np.uint32) << 16).view(np.float32)
    if a.dtype in (np.float32, np.float16):
        return a.astype(np.float32)
    raise SafetensorsError(f"cannot convert dtype {a.dtype} to float32")


def from_float32(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 -> float32/float16/bfloat16 (bfloat16 rounded to nearest even, NaN kept NaN)."""
    a = np.asarray(a, dtype=np.float32)
    if dtype == BFLOAT16:
        bits = a.view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = np.where(np.isnan(a), (bits >> 16) | 0x40, rounded)  # keep NaN a quiet NaN
        return rounded.astype("<u2").view(BFLOAT16)
    return a.astype(dtype)


# --- single files ---------------------------------------------------------------------------------------


def read_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries by name, __metadata__, byte offset of the data) of one file, validated."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{path}: {size} bytes is too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise SafetensorsError(f"{path}: header length {n} does not fit the file of {size} bytes")
            raw = f.read(n)
    except OSError as e:
        raise SafetensorsError(f"cannot read {path}: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is a {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings, got {metadata!r}")
    data_len = size - 8 - n
    # Every byte of the data belongs to exactly one tensor, in offset order, as the reference writer does.
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed entry {entry!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {dtype!r}; supported: {list(_DTYPES)}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise SafetensorsError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise SafetensorsError(f"{path}: tensor {name!r} has offsets {offsets!r} outside the data "
                                   f"of {data_len} bytes (truncated file?)")
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise SafetensorsError(f"{path}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but "
                                   f"{dtype} {shape} needs {nbytes}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise SafetensorsError(f"{path}: tensor {name!r} starts at {begin}, expected {end} "
                                   f"(overlapping or gapped data)")
        end = stop
    if end != data_len:
        raise SafetensorsError(f"{path}: tensors cover {end} bytes but the file holds {data_len} data bytes")
    return header, metadata, 8 + n


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one file, in their stored dtype, as read-only memory-mapped arrays."""
    path = Path(path)
    header, _, data_start = read_header(path)
    data_len = path.stat().st_size - data_start
    if data_len == 0:
        buf = np.zeros(0, np.uint8)
    else:
        buf = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_len,))
    out = {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        out[name] = buf[begin:end].view(np.ndarray).view(_DTYPES[e["dtype"]]).reshape(e["shape"])
    return out


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None, *,
                      on_written: Callable[[str, int], None] | None = None) -> None:
    """Write `tensors` in the given order; the file is fsynced before returning. `on_written(name, nbytes)` is
    called after each tensor's bytes are written (a progress bar's hook)."""
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
    for name, a in tensors.items():
        if not isinstance(a, np.ndarray) or a.dtype not in _NAMES:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {getattr(a, 'dtype', type(a))}; "
                                   f"supported: float32, float16, bfloat16 ({BFLOAT16})")
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            raise SafetensorsError(f"{path}: tensor {name!r} is big-endian")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, a in zip(tensors, arrays):
                f.write(a.reshape(-1).view(np.uint8).data)
                if on_written is not None:
                    on_written(name, a.nbytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise SafetensorsError(f"cannot write {path}: {e}") from e


# --- sharded checkpoints --------------------------------------------------------------------------------


def read_sharded(index_path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint split over files listed in a `model.safetensors.index.json`.

    The index's weight_map must account for every tensor exactly: a shard holding a tensor the map sends
    elsewhere (or does not list), or missing one the map promises, is an error."""
    index_path = Path(index_path)
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise SafetensorsError(f"cannot read shard index {index_path}: {e!r}") from e
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SafetensorsError(f"{index_path}: weight_map must map tensor names to file names")
    by_file: dict[str, set[str]] = {}
    for name, fname in weight_map.items():
        # Shards live beside the index; a path elsewhere would read files the checkpoint does not own.
        if Path(fname).name != fname:
            raise SafetensorsError(f"{index_path}: tensor {name!r} maps to {fname!r}, not a file beside the index")
        by_file.setdefault(fname, set()).add(name)
    out: dict[str, np.ndarray] = {}
    for fname in sorted(by_file):
        shard = read_safetensors(index_path.parent / fname)
        missing = sorted(by_file[fname] - set(shard))
        extra = sorted(set(shard) - by_file[fname])
        if missing or extra:
            raise SafetensorsError(f"{index_path.parent / fname}: does not match {index_path.name}: "
                                   f"missing {missing}, not in the index {extra}")
        out.update(shard)
    return {name: out[name] for name in weight_map}


def read_checkpoint(directory: str | Path) -> dict[str, np.ndarray]:
    """Tensors of `model.safetensors` or, failing that, of the shards in `model.safetensors.index.json`."""
    directory = Path(directory)
    single, index = directory / "model.safetensors", directory / INDEX_NAME
    if single.is_file() and index.is_file():
        raise SafetensorsError(f"{directory} holds both {single.name} and {index.name}; which one is meant?")
    if single.is_file():
        return read_safetensors(single)
    if index.is_file():
        return read_sharded(index)
    raise SafetensorsError(f"{directory} has neither model.safetensors nor {INDEX_NAME}")
