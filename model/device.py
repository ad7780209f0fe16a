"""Process-wide MindSpore settings for running the model: graph mode on a device target.

Importing this module changes nothing; every process that runs the model (workers, ranks, the trainer, the
one-shot commands) calls `configure_mindspore()` once before building it.
"""

from __future__ import annotations

from pathlib import Path


def configure_mindspore(device_target: str = "CPU", compile_cache: str | Path | None = None) -> None:
    """Graph mode (compiled; decode is many times faster than PyNative) on the given device. Idempotent.
    compile_cache: a directory for MindSpore's compile cache (graphs compiled once are loaded from it by the
    next process); the caller keys it by everything the graphs depend on (runner.graph_cache_dir)."""
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    if compile_cache is not None:
        ms.set_context(enable_compile_cache=True, compile_cache_path=str(compile_cache))
    try:
        ms.set_device(device_target)
    except RuntimeError:  # already fixed (after `communication.init()` on a rank): only the same one is fine
        if ms.get_context("device_target") != device_target:
            raise
