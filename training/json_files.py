"""Reading and writing the JSON files of data preparation: errors name the file, writes are atomic."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .data_error import DataError


def read_json(path: str | Path) -> object:
    path = Path(path)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not UTF-8 JSON: {e}") from e


def write_json_atomic(path: str | Path, obj: object, *, overwrite: bool = False) -> Path:
    """Write beside the target and rename, so a failed run never leaves half a file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DataError(f"output {path} already exists (pass overwrite / --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
