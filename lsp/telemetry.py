"""Local telemetry: what happened to each suggestion, counted in memory and appended to a JSONL log.

Nothing leaves the machine: events go to `events.jsonl` in the settings' log directory (rotated at
`log_max_bytes`, `log_backups` old files kept) and to the counters that `codefill/stats` returns. Events
carry sizes and timings, never source text.

    shown      a suggestion was returned to the editor (id, latency, source: model / cache / prefetch)
    accepted   the editor ran the item's `codefill.accept` command (or typed the whole suggestion)
    dismissed  `codefill.dismiss`, or the next keystroke on that document did not follow the suggestion
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
LOG_NAME = "events.jsonl"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class JsonlLog:
    """Append-only JSONL with size-based rotation: events.jsonl -> events.jsonl.1 -> ... -> .N (dropped)."""

    def __init__(self, directory: Path, max_bytes: int, backups: int):
        self.path = Path(directory) / LOG_NAME
        self.max_bytes, self.backups = max_bytes, backups
        self.failed = False

    def write(self, event: dict) -> None:
        if self.failed:
            return
        line = json.dumps(event, separators=(",", ":")) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                self._rotate()
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as e:  # a read-only home must not break completions; say so once
            self.failed = True
            logger.warning("telemetry log %s disabled: %s", self.path, e)

    def _rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink()
            return
        for i in range(self.backups, 0, -1):
            src = self.path if i == 1 else self.path.with_name(f"{LOG_NAME}.{i - 1}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{LOG_NAME}.{i}"))


class Telemetry:
    def __init__(self, log: JsonlLog | None = None, window: int = 1000):
        self.log = log
        self.latencies_ms: deque[float] = deque(maxlen=window)  # keystroke (request) to suggestion
        self.counts = {"requests": 0, "model_calls": 0, "cache_hits": 0, "cache_misses": 0, "prefetches": 0,
                       "shown": 0, "accepted": 0, "dismissed": 0, "hidden_low_confidence": 0, "errors": 0}
        self.open: dict[str, dict] = {}  # suggestion id -> its shown event, until accepted or dismissed

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def event(self, kind: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.write({"t": round(time.time(), 3), "event": kind, **fields})

    def shown(self, sid: str, latency_ms: float, source: str, uri: str, n_chars: int, mean_logprob: float | None):
        self.counts["shown"] += 1
        self.latencies_ms.append(latency_ms)
        info = {"id": sid, "latency_ms": round(latency_ms, 2), "source": source, "chars": n_chars,
                "mean_logprob": None if mean_logprob is None else round(mean_logprob, 4)}
        self.open[sid] = {"uri": uri, **info}
        if len(self.open) > 256:
            self.open.pop(next(iter(self.open)))
        self.event("shown", **info)

    def accepted(self, sid: str) -> bool:
        info = self.open.pop(sid, None)
        if info is None:
            return False
        self.counts["accepted"] += 1
        self.event("accepted", id=sid, source=info["source"], chars=info["chars"])
        return True

    def dismissed(self, sid: str, why: str) -> bool:
        info = self.open.pop(sid, None)
        if info is None:
            return False
        self.counts["dismissed"] += 1
        self.event("dismissed", id=sid, why=why)
        return True

    def open_ids(self, uri: str) -> list[str]:
        return [sid for sid, info in self.open.items() if info["uri"] == uri]

    def stats(self) -> dict:
        lat = list(self.latencies_ms)
        c = self.counts
        lookups = c["cache_hits"] + c["cache_misses"]
        decided = c["accepted"] + c["dismissed"]
        return {
            "latency_ms": {"n": len(lat), "p50": percentile(lat, 50), "p90": percentile(lat, 90),
                           "p95": percentile(lat, 95), "p99": percentile(lat, 99)},
            "cache_hit_rate": c["cache_hits"] / lookups if lookups else 0.0,
            "acceptance_rate": c["accepted"] / decided if decided else 0.0,
            **c,
            "log": str(self.log.path) if self.log is not None else None,
        }
