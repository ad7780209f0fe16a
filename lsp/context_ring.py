"""Context from other files: a bounded ring of chunks (recently edited regions, heads of open documents).

What goes before the FIM prefix must change as rarely as possible: the workers reuse the KV cache of the
longest shared token prefix, and the context comes first in the prompt. So:

- chunks keep the order in which they entered the ring; re-editing a region updates its chunk in place
  (its slot in the order is kept) instead of moving it to the end;
- the document being completed never contributes chunks (its own text is the prefix and suffix);
- when the ring is full, the chunk touched longest ago leaves.

A chunk is `lines_around` lines either side of an edit, or the first `head_lines` lines of a document when
it is opened; edits that land inside an existing region of the same document extend that region.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

from .prompt import Chunk


@dataclass
class _Region:
    uri: str
    path: str
    start: int  # first line
    end: int  # one past the last line
    text: str
    order: int  # position in the stable order (when it entered)
    touched: int  # last time it was updated (for eviction)


@dataclass
class ContextRing:
    max_chunks: int = 8
    lines_around: int = 20
    head_lines: int = 40
    max_chunk_chars: int = 4000  # a pathological line cannot blow the prompt budget's computation up
    _regions: list[_Region] = field(default_factory=list)
    _clock: count = field(default_factory=count)

    def __post_init__(self) -> None:
        for name, least in (("max_chunks", 1), ("lines_around", 0), ("head_lines", 1), ("max_chunk_chars", 1)):
            if getattr(self, name) < least:
                raise ValueError(f"ContextRing.{name} must be >= {least}, got {getattr(self, name)}")

    def note_open(self, uri: str, path: str, text: str) -> None:
        """A document was opened: its head is context for the others."""
        lines = text.splitlines(keepends=True)
        self._put(uri, path, 0, min(len(lines), self.head_lines), lines)

    def note_edit(self, uri: str, path: str, text: str, line: int) -> None:
        """The user edited `line` of a document whose full text is now `text`."""
        lines = text.splitlines(keepends=True)
        start = max(0, line - self.lines_around)
        end = min(len(lines), line + self.lines_around + 1)
        self._put(uri, path, start, end, lines)

    def forget(self, uri: str) -> None:
        """A document was closed."""
        self._regions = [r for r in self._regions if r.uri != uri]

    def chunks(self, exclude_uri: str | None = None) -> list[Chunk]:
        """The context for a completion in `exclude_uri`, in stable order."""
        return [Chunk(r.path, r.text) for r in sorted(self._regions, key=lambda r: r.order) if r.uri != exclude_uri]

    def _put(self, uri: str, path: str, start: int, end: int, lines: list[str]) -> None:
        now = next(self._clock)
        for r in self._regions:
            if r.uri == uri and start <= r.end and r.start <= end:  # overlaps or touches: grow it in place
                lo, hi = min(r.start, start), max(r.end, end)
                if hi - lo > max(self.head_lines, 2 * self.lines_around + 1):
                    lo, hi = start, end  # grown too big: follow the latest edit
                r.start, r.end, r.path, r.touched = lo, hi, path, now
                r.text = "".join(lines[lo:hi])[: self.max_chunk_chars]
                return
        if end <= start:
            return
        if len(self._regions) >= self.max_chunks:
            self._regions.remove(min(self._regions, key=lambda r: r.touched))
        self._regions.append(_Region(uri, path, start, end, "".join(lines[start:end])[: self.max_chunk_chars],
                                     order=now, touched=now))
