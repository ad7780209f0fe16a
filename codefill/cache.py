"""Where codefill keeps what it builds or writes for itself: $CODEFILL_CACHE, default ~/.cache/codefill
(compiled graphs, the CPU kernels, llama.cpp, MindSpore's logs; docs/ARCHITECTURE.md lists them)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("CODEFILL_CACHE", Path.home() / ".cache" / "codefill"))
