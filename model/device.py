"""Where the model runs: the device name (`--device cpu|ascend|gpu`, or CODEFILL_DEVICE), whether that device
is present, and the process-wide MindSpore settings for running the model on it.

    device = resolve_device(args.device)   # the flag, else CODEFILL_DEVICE, else cpu; checked present
    configure_mindspore(device)            # in every process that runs the model, before building it

Names: codefill says `cpu`, `ascend`, `gpu`; MindSpore's device targets are "CPU", "Ascend", "GPU".

Present means, before any rank starts (the launchers call `check_device_present` in the parent):
- ascend: Ascend device files (/dev/davinci0, /dev/davinci1, ...; the driver makes one per NPU) and
  MindSpore's Ascend plugin loaded (`mindspore.device_context.ascend.is_available()`: libmindspore_ascend
  needs the CANN runtime, e.g. libge_runner.so, on the library path);
- gpu: NVIDIA device files (/dev/nvidia0, ...) and MindSpore's GPU plugin loaded
  (`mindspore.device_context.gpu.is_available()`: needs a matching CUDA runtime);
- cpu: always.

Ranks under msrun: msrun exports DEVICE_ID = the rank's local rank on its node (mindspore/parallel/cluster/
process_entity/_api.py, `_start_single_worker`), so on an accelerator each rank binds device DEVICE_ID
(`ms.set_device(target, device_id)`). `mindspore.communication.init()` with no backend name then picks the
collective library of the device target: HCCL on Ascend, NCCL on GPU, MindSpore's own on CPU.

Importing this module changes nothing and does not import MindSpore.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from codefill.errors import CodefillError

DEVICE_ENV = "CODEFILL_DEVICE"
DEFAULT_DEVICE = "cpu"
TARGETS = {"cpu": "CPU", "ascend": "Ascend", "gpu": "GPU"}  # codefill name -> MindSpore device target
_DEVICE_FILES = {"ascend": "/dev/davinci[0-9]*", "gpu": "/dev/nvidia[0-9]*"}
_PLUGIN_NEEDS = {"ascend": "the CANN toolkit matching MindSpore (source its set_env.sh)",
                 "gpu": "a CUDA runtime matching MindSpore's GPU build"}


class DeviceError(CodefillError):
    """A device name that is not one of the choices, or a device that is not present; the message names the
    device and what was looked for."""


def parse_device(name: str, where: str = "--device") -> str:
    """'cpu', 'ascend' or 'gpu' (MindSpore's spellings "CPU", "Ascend", "GPU" are accepted too)."""
    key = str(name).strip().lower()
    if key not in TARGETS:
        raise DeviceError(f"{where} {name!r} is not a device: choose one of {', '.join(TARGETS)}")
    return key


def device_setting(flag: str | None) -> str:
    """The device a command asked for: the flag, else $CODEFILL_DEVICE, else cpu. Parsed, not yet checked."""
    if flag is not None:
        return parse_device(flag)
    env = os.environ.get(DEVICE_ENV)
    if env:
        return parse_device(env, f"${DEVICE_ENV}")
    return DEFAULT_DEVICE


def resolve_device(flag: str | None) -> str:
    """`device_setting(flag)`, checked present (DeviceError otherwise). What every command runs first."""
    device = device_setting(flag)
    check_device_present(device)
    return device


def target(device: str) -> str:
    """MindSpore's device target name of a codefill device name."""
    return TARGETS[parse_device(device)]


def device_files(device: str) -> list[str]:
    """The device files of an accelerator visible here (empty for cpu)."""
    pattern = _DEVICE_FILES.get(parse_device(device))
    return sorted(glob.glob(pattern)) if pattern else []


def check_device_present(device: str) -> None:
    """Raise DeviceError unless `device` can run the model here (see the module docstring for what is looked
    for). Cheap checks first: the device files are looked for before MindSpore is imported."""
    device = parse_device(device)
    if device == "cpu":
        return
    name = TARGETS[device]
    pattern = _DEVICE_FILES[device]
    if not device_files(device):
        raise DeviceError(f"device {device}: no {name} device is visible on this machine (looked for device "
                          f"files {pattern}: none); run on a machine with {name} devices, or use --device cpu")
    loaded, why = _plugin_loaded(device)
    if not loaded:
        raise DeviceError(f"device {device}: {len(device_files(device))} {name} device file(s) found, but "
                          f"MindSpore's {name} plugin is not loaded ({why}); install {_PLUGIN_NEEDS[device]}")


def _plugin_loaded(device: str) -> tuple[bool, str]:
    """(loaded, MindSpore's plugin load error) for an accelerator's plugin."""
    import mindspore as ms
    from mindspore._c_expression import MSContext

    ctx = ms.device_context.ascend if device == "ascend" else ms.device_context.gpu
    if ctx.is_available():
        return True, ""
    return False, MSContext.get_instance().load_plugin_error().strip().replace("\n", "; ") or "no error reported"


def local_device_id() -> int:
    """The device this process binds on an accelerator: its local rank under msrun (msrun's DEVICE_ID), 0
    for a single process."""
    value = os.environ.get("DEVICE_ID", "0")
    try:
        device_id = int(value)
    except ValueError:
        raise DeviceError(f"DEVICE_ID {value!r} (set by msrun to the local rank) is not an integer") from None
    if device_id < 0:
        raise DeviceError(f"DEVICE_ID {device_id} (set by msrun to the local rank) is negative")
    return device_id


def configure_mindspore(device: str = DEFAULT_DEVICE, compile_cache: str | Path | None = None) -> None:
    """Graph mode (compiled; decode is many times faster than PyNative) on `device` (a codefill name or a
    MindSpore target), bound to this rank's own device id on an accelerator. Idempotent.
    compile_cache: a directory for MindSpore's compile cache (graphs compiled once are loaded from it by the
    next process); the caller keys it by everything the graphs depend on (runner.graph_cache_dir)."""
    import mindspore as ms

    device = parse_device(device)
    name = TARGETS[device]
    ms.set_context(mode=ms.GRAPH_MODE)
    if compile_cache is not None:
        ms.set_context(enable_compile_cache=True, compile_cache_path=str(compile_cache))
    device_id = None if device == "cpu" else local_device_id()
    try:
        if device_id is None:
            ms.set_device(name)
        else:
            ms.set_device(name, device_id)
    except RuntimeError:  # already fixed (after `communication.init()` on a rank): only the same one is fine
        if ms.get_context("device_target") != name:
            raise
