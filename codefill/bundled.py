"""The bundled model: `models/codefill-pypi-5m` in this repository, what `codefill serve`, `demo`, `generate`,
`infill` and `eval` use when no --model is given.

It is the output of `codefill recipe recipes/codefill-pypi-cpu.toml` on the corpus that `codefill data corpus
recipes/corpus/pypi.toml` builds (its model card is the README.md beside it, its data card DATA.md): a small Code
Llama-architecture model trained from scratch on permissively licensed Python from PyPI and the standard library.
It lives in the source tree, next to the `codefill` package folder, so an editable install (what scripts/setup.sh
makes) finds it from any directory.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_NAME = "codefill-pypi-5m"


def bundled_model_dir() -> Path:
    """The bundled MODEL_DIR's path (it may be missing: a non-editable install does not carry it)."""
    return Path(__file__).resolve().parent.parent / "models" / BUNDLED_NAME
