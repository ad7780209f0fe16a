"""MindSpore's native log lines stay out of the user's terminal: they go to a log directory instead.

MindSpore (its C++ glog and its Python logger alike) reads GLOG_* from the environment when it is first
imported, in every process. `quiet()` is the first thing `codefill` does (codefill/cli.py `main`), so the
variables are set before any import of mindspore in that process, and inherited by every process it starts:
a worker (`startup.spawn_worker`), msrun and its ranks (`launch.msrun_env` copies os.environ), training ranks.

    GLOG_v=3                 errors only: warnings such as `[WARNING] ... expander_fallback` are dropped
    GLOG_logtostderr=0       into files, not the terminal
    GLOG_log_dir=DIR         DIR/rank_N/logs/mindspore.log* ($CODEFILL_CACHE/logs, default ~/.cache/codefill/logs)
    GLOG_stderrthreshold=4   nothing echoed to stderr below critical

A variable already set is kept, so `GLOG_v=1 codefill ...` still debugs. Errors that reach the user name
the directory (`where()`), since what MindSpore logged before raising is there.
"""

from __future__ import annotations

import os
from pathlib import Path

from codefill.cache import cache_root

DEFAULTS = {"GLOG_v": "3", "GLOG_logtostderr": "0", "GLOG_stderrthreshold": "4"}


def log_dir() -> Path:
    return cache_root() / "logs"


def quiet_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with the GLOG_* defaults filled in where unset (a new dict)."""
    out = dict(env)
    for name, value in DEFAULTS.items():
        out.setdefault(name, value)
    out.setdefault("GLOG_log_dir", str(log_dir()))
    return out


def quiet() -> Path:
    """Set the defaults in this process's environment (before mindspore is imported) and create the log
    directory; returns it."""
    os.environ.update(quiet_env(dict(os.environ)))
    path = Path(os.environ["GLOG_log_dir"])
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache: MindSpore then logs nowhere, which still keeps the terminal clean
        pass
    return path


def where() -> str:
    """A sentence for error messages: where MindSpore's own log lines of this run are."""
    return f"MindSpore's native log: {os.environ.get('GLOG_log_dir', log_dir())}/rank_*/logs/"
