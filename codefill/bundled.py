"""The bundled model: `models/codefill-stdlib` in this repository, what `codefill serve`, `demo`, `generate`,
`infill` and `eval` use when no --model is given.

It is the output of `codefill recipe recipes/codefill-stdlib.toml` (its model card is the README.md beside it): a
small Code Llama-architecture model trained from scratch on the Python standard library. It lives in the source
tree, next to the `codefill` package folder, so an editable install (what scripts/setup.sh makes) finds it from any
directory.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_NAME = "codefill-stdlib"


def bundled_model_dir() -> Path:
    """The bundled MODEL_DIR's path (it may be missing: a non-editable install does not carry it)."""
    return Path(__file__).resolve().parent.parent / "models" / BUNDLED_NAME
