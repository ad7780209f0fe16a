"""Process-wide MindSpore settings for running the model: graph mode on a device target.

Importing this module changes nothing; every process that runs the model (workers, ranks, the trainer, the
one-shot commands) calls `configure_mindspore()` once before building it.
"""

from __future__ import annotations


def configure_mindspore(device_target: str = "CPU") -> None:
    """Graph mode (compiled; decode is many times faster than PyNative) on the given device. Idempotent."""
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        ms.set_device(device_target)
    except RuntimeError:  # already fixed (after `communication.init()` on a rank): only the same one is fine
        if ms.get_context("device_target") != device_target:
            raise
