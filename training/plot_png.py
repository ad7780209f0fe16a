"""A loss curve as a PNG with no plotting dependency: lines rasterised into an RGB array, zlib-compressed.

Good enough to eyeball a run (train loss in blue, held-out loss in orange, axes with min/max ticks); anyone
wanting a publication plot has metrics.jsonl.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

W, H, MARGIN = 640, 360, 30
BLUE, ORANGE, GREY = (31, 119, 180), (255, 127, 14), (150, 150, 150)


def _line(img, x0, y0, x1, y1, color):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, n).round().astype(int).clip(0, W - 1)
    ys = np.linspace(y0, y1, n).round().astype(int).clip(0, H - 1)
    for dy in (0, 1):
        img[(ys + dy).clip(0, H - 1), xs] = color


def write_png(path: str | Path, img: np.ndarray) -> None:
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(img.shape[0]))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", img.shape[1], img.shape[0], 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def plot_losses(path: str | Path, train: list[tuple[int, float]], held_out: list[tuple[int, float]]) -> None:
    """train / held_out: (step, loss) pairs."""
    img = np.full((H, W, 3), 255, np.uint8)
    points = train + held_out
    if not points:
        write_png(path, img)
        return
    steps = [s for s, _ in points]
    losses = [v for _, v in points if np.isfinite(v)]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    lo, hi = (min(losses), max(losses)) if losses else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    to_x = lambda s: MARGIN + (s - s0) / (s1 - s0) * (W - 2 * MARGIN)
    to_y = lambda v: H - MARGIN - (v - lo) / (hi - lo) * (H - 2 * MARGIN)
    _line(img, MARGIN, H - MARGIN, W - MARGIN, H - MARGIN, GREY)
    _line(img, MARGIN, MARGIN, MARGIN, H - MARGIN, GREY)
    for series, color in ((train, BLUE), (held_out, ORANGE)):
        for (a, va), (b, vb) in zip(series, series[1:]):
            _line(img, to_x(a), to_y(va), to_x(b), to_y(vb), color)
        for s, v in series:
            x, y = int(to_x(s)), int(to_y(v))
            img[max(0, y - 2):y + 3, max(0, x - 2):x + 3] = color
    write_png(path, img)
