"""The language server's settings: one defaults table, documented key by key, merged with the user's options.

Settings come from three places, later ones winning: this table's defaults, `codefill serve` flags, and the
client (`initializationOptions` at start, then `workspace/didChangeConfiguration`, whose `settings` may be
the keys themselves or nested under "codefill"). Unknown keys and bad values are refused with a
`SettingsError` that names them; a refused change leaves the previous settings in force.

The README's "Language server configuration" section mirrors this table; keep the two in step.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codefill.errors import CodefillError
from codefill.model.device import TARGETS


class SettingsError(CodefillError, ValueError):
    """A setting that cannot be used; the message names the key and the value."""


@dataclass(frozen=True)
class Settings:
    # --- the worker ---
    endpoint: str | None = None  # a running worker (ipc://PATH, tcp://127.0.0.1:PORT); None: start one on --model
    tp: int = 1  # tensor-parallel ranks for a worker this server starts (>1: msrun, launch.start_workers)
    request_timeout_s: float = 60.0  # longest silence from the worker during one request
    worker_start_timeout_s: float = 300.0  # model load + graph compile; minutes for a 7B on CPU
    worker_max_seq_len: int | None = None  # context of a started worker; None = the worker's default (2048)
    worker_device: str = "cpu"  # where a started worker runs the model: "cpu", "ascend" or "gpu"
    reconnect_interval_s: float = 2.0  # while the worker is down, how often it is pinged (and restarted if ours)

    # --- the prompt (lsp/prompt.py) ---
    max_prompt_tokens: int = 1536  # ids sent to the worker; also capped by the worker's context
    suffix_share: float = 0.25  # the text after the cursor may take at most this share of the budget
    context_share: float = 0.35  # other open documents and recent edits may take at most this share
    fim_order: str = "spm"  # "spm" (suffix first: keystrokes extend the prompt, the cache hits) or "psm"
    path_header: bool = True  # a "# Path: a/b.py" comment line before the prefix
    context_chunks: int = 8  # chunks of other documents kept in the context ring (0: no cross-file context)
    max_document_chars: int = 4_000_000  # larger documents get no completions (an empty answer)

    # --- generation ---
    max_new_tokens: int = 64  # longest middle, in tokens; generation usually ends earlier at <EOT> or a stop rule
    temperature: float = 0.0  # 0 = greedy (what prefix reuse and in-flight extension are built for)
    token_healing: bool = True  # back off a partial identifier and make the model re-generate it
    min_mean_logprob: float | None = None  # hide suggestions whose mean token log-prob is lower; None: show all
    blank_line_min_tokens: int = 1  # on a blank line the model may not end (<EOT>) before this many ids; 0: it may

    # --- request lifecycle ---
    debounce_min_ms: float = 15.0  # wait at least this long after a keystroke before calling the model
    debounce_max_ms: float = 150.0  # ... and at most this long, when the user types faster than answers come
    cache_size: int = 64  # suggestions kept for typed-ahead and accepted text
    prefetch: bool = True  # after a suggestion is shown, compute the one that follows its acceptance
    prefetch_delay_ms: float = 100.0  # ... once the user has paused this long: a prefetch that a keystroke
    # then cancels still held the worker slot whose cache the keystroke's own request needed
    languages: tuple[str, ...] = ("*",)  # LSP language ids to complete; "*" = all

    # --- local telemetry (nothing leaves the machine) ---
    telemetry: bool = True  # write events to a JSONL log
    log_dir: str | None = None  # None: $XDG_STATE_HOME/codefill, or ~/.local/state/codefill
    log_max_bytes: int = 1_000_000  # rotate the log at this size
    log_backups: int = 3  # rotated logs kept (events.jsonl.1 ... .N)

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise SettingsError(f"setting {key} = {getattr(self, key)!r}: {what}")

        for key in ("tp", "max_prompt_tokens", "max_new_tokens", "max_document_chars", "log_max_bytes"):
            need(_is_int(getattr(self, key)) and getattr(self, key) >= 1, key, "must be an integer >= 1")
        for key in ("context_chunks", "cache_size", "log_backups", "blank_line_min_tokens"):
            need(_is_int(getattr(self, key)) and getattr(self, key) >= 0, key, "must be an integer >= 0")
        need(self.max_prompt_tokens >= 8, "max_prompt_tokens", "must be >= 8")
        need(self.worker_max_seq_len is None or (_is_int(self.worker_max_seq_len) and self.worker_max_seq_len > 0),
             "worker_max_seq_len", "must be a positive integer or null")
        for key in ("request_timeout_s", "worker_start_timeout_s", "reconnect_interval_s"):
            need(_is_num(getattr(self, key)) and getattr(self, key) > 0, key, "must be a number > 0")
        for key in ("suffix_share", "context_share"):
            need(_is_num(getattr(self, key)) and 0 <= getattr(self, key) <= 1, key, "must be in [0, 1]")
        for key in ("debounce_min_ms", "debounce_max_ms", "prefetch_delay_ms", "temperature"):
            need(_is_num(getattr(self, key)) and getattr(self, key) >= 0, key, "must be a number >= 0")
        need(self.debounce_min_ms <= self.debounce_max_ms, "debounce_max_ms", "must be >= debounce_min_ms")
        need(self.fim_order in ("spm", "psm"), "fim_order", 'must be "spm" or "psm"')
        need(self.worker_device in TARGETS, "worker_device", f"must be one of {', '.join(TARGETS)}")
        need(self.min_mean_logprob is None or (_is_num(self.min_mean_logprob) and self.min_mean_logprob <= 0),
             "min_mean_logprob", "must be a number <= 0 or null")
        need(self.endpoint is None or isinstance(self.endpoint, str), "endpoint", "must be a string or null")
        need(self.log_dir is None or isinstance(self.log_dir, str), "log_dir", "must be a string or null")
        need(isinstance(self.languages, tuple) and all(isinstance(x, str) for x in self.languages), "languages",
             "must be a list of language ids")
        for key in ("path_header", "token_healing", "prefetch", "telemetry"):
            need(isinstance(getattr(self, key), bool), key, "must be true or false")

    @property
    def spm(self) -> bool:
        return self.fim_order == "spm"

    def language_enabled(self, language_id: str | None) -> bool:
        return "*" in self.languages or (language_id or "") in self.languages

    def telemetry_dir(self) -> Path:
        if self.log_dir:
            return Path(self.log_dir).expanduser()
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        return Path(state) / "codefill"

    def merged(self, options: Any) -> "Settings":
        """These settings with the client's `options` (a dict, or {"codefill": dict}) applied.

        An empty list counts as an empty object: Lua has one table type, and Neovim's JSON encoder writes an
        empty one (the plugin's default `settings = {}`) as `[]`."""
        if options is None or options == []:
            return self
        if not isinstance(options, dict):
            raise SettingsError(f"settings must be a JSON object, got {type(options).__name__} {options!r:.80}")
        if options.get("codefill") == []:
            return self
        if isinstance(options.get("codefill"), dict):
            options = options["codefill"]
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SettingsError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(options)
        if "languages" in values:
            langs = values["languages"]
            values["languages"] = tuple(langs) if isinstance(langs, list) else langs
        for key in ("min_mean_logprob",):
            if isinstance(values.get(key), (int, float)) and not isinstance(values[key], bool) \
                    and math.isinf(values[key]):
                values[key] = None
        try:
            return dataclasses.replace(self, **values)
        except TypeError as e:  # pragma: no cover - unknown keys are caught above
            raise SettingsError(str(e)) from e


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def table() -> list[tuple[str, Any, str]]:
    """(key, default, comment) for every setting, read from this file: what the README table shows."""
    import inspect
    import re

    source = inspect.getsource(Settings)
    out = []
    for f in dataclasses.fields(Settings):
        m = re.search(rf"^\s+{f.name}: [^=]+= (.+?)  # (.+)$", source, re.M)
        out.append((f.name, f.default, m.group(2) if m else ""))
    return out

