"""When prompt-lookup speculation pays: a verify step must make more tokens than its cost in decode steps.

A verify of the next id and its drafts (`Runner.verify`) costs more than a decode step: on the bundled model
about 2x (3.7 against 1.9 ms), and with a quarter of the drafts accepted it makes ~1.5 tokens, so it
lowers the steps but raises the suggestion's latency (docs/benchmarks/speculation.md). On bigger models a
decode step is mostly reading the weights, which a verify reads once for all its rows, and speculation wins.

The gate measures instead of guessing: moving averages of a lone decode step's time, a verify step's time,
and the tokens a verify step makes (kept drafts + 1). Speculate while unmeasured, and while
`made x decode >= verify`; otherwise decode plainly, re-measuring with a speculation every PROBE_EVERY
steps in case the text (and so the acceptance) changed.
"""

from __future__ import annotations

from dataclasses import dataclass

ALPHA = 0.2  # weight of the newest measurement in each moving average
PROBE_EVERY = 16  # while speculation does not pay, try it once in this many draftable steps


@dataclass
class SpeculationGate:
    decode_s: float | None = None  # a decode step of one row
    verify_s: float | None = None  # a verify step
    made: float | None = None  # tokens a verify step makes
    skipped: int = 0  # draftable steps decoded plainly since the last probe

    def should_speculate(self) -> bool:
        if self.decode_s is None or self.verify_s is None or self.made is None:
            return True
        if self.made * self.decode_s >= self.verify_s:
            return True
        self.skipped += 1
        if self.skipped >= PROBE_EVERY:
            self.skipped = 0
            return True
        return False

    def decoded(self, seconds: float) -> None:
        self.decode_s = _average(self.decode_s, seconds)

    def verified(self, seconds: float, tokens_made: int) -> None:
        self.verify_s = _average(self.verify_s, seconds)
        self.made = _average(self.made, float(tokens_made))


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new
