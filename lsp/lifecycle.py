"""The life of a completion request between the keystroke and the model: debounce, supersede, cancel.

An editor asks for a suggestion on every keystroke. Most of those requests are overtaken before a
suggestion could be shown, so:

- debounce, adaptively: while the user types faster than the model answers (the typing gap, an average
  over recent keystrokes, is below the measured latency), a request waits about one typing gap, since the
  next keystroke will probably supersede it; when the user pauses or the model is fast, it waits only
  `debounce_min_ms`. Never more than `debounce_max_ms`;
- supersede: a newer request for the same document cancels the older one's model call (the worker gets a
  Cancel and frees its slot within one token) and the older request is answered with an empty result;
- $/cancelRequest cancels the handler's task; the model call inside it is cancelled with it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field

PAUSE_S = 2.0  # a gap longer than this is a pause, not typing speed


class Superseded(Exception):
    """A newer request for the same document took over; answer this one with an empty result."""


@dataclass
class Debounce:
    alpha: float = 0.3  # weight of the newest sample in the moving averages
    gap_s: float | None = None  # typing gap
    latency_s: float | None = None  # model call latency
    _last: float | None = None

    def keystroke(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._last is not None and (gap := now - self._last) < PAUSE_S:
            self.gap_s = gap if self.gap_s is None else (1 - self.alpha) * self.gap_s + self.alpha * gap
        self._last = now

    def model_latency(self, seconds: float) -> None:
        self.latency_s = seconds if self.latency_s is None else (1 - self.alpha) * self.latency_s + self.alpha * seconds

    def delay_s(self, min_ms: float, max_ms: float) -> float:
        lo, hi = min_ms / 1000, max_ms / 1000
        if self.gap_s is None or self.latency_s is None or self.gap_s >= self.latency_s:
            return lo
        return min(hi, max(lo, 1.2 * self.gap_s))


@dataclass
class _Doc:
    seq: int = 0
    task: asyncio.Task | None = None  # the model call of request `seq`


@dataclass
class Requests:
    """Per document: which request is the newest, and its model call."""

    _docs: dict[str, _Doc] = field(default_factory=dict)

    def begin(self, uri: str) -> int:
        doc = self._docs.setdefault(uri, _Doc())
        doc.seq += 1
        if doc.task is not None and not doc.task.done():
            doc.task.cancel()
        doc.task = None
        return doc.seq

    def check(self, uri: str, seq: int) -> None:
        if self._docs[uri].seq != seq:
            raise Superseded()

    async def run(self, uri: str, seq: int, coro: Awaitable):
        """Await `coro` as request `seq`'s model call; Superseded if a newer request cancels it."""
        self.check(uri, seq)
        doc = self._docs[uri]
        task = asyncio.ensure_future(coro)
        doc.task = task
        try:
            return await task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise  # this request itself was cancelled ($/cancelRequest, shutdown)
            raise Superseded() from None
        finally:
            if doc.task is task:
                doc.task = None

    def forget(self, uri: str) -> None:
        doc = self._docs.pop(uri, None)
        if doc is not None and doc.task is not None:
            doc.task.cancel()
