"""The demo's picture: a PNG drawn with the standard library (zlib), so no plotting package is
needed. Two panels over the same time axis: a tenant's TTFT p99 against its objective, and the
peer memory it holds (RESERVATION and ELASTIC), with the demo's phases marked. Every point is a
value Prometheus returned for a range query; nothing is smoothed or made up, and gaps (no
traffic, no sample) stay gaps.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

Color = tuple[int, int, int]
Points = Sequence[tuple[float, float | None]]  # (unix time, value or None for a gap)

WHITE: Color = (255, 255, 255)
BLACK: Color = (20, 20, 20)
GREY: Color = (200, 200, 200)
DARK: Color = (110, 110, 110)
BLUE: Color = (31, 119, 180)
RED: Color = (214, 39, 40)
GREEN: Color = (44, 160, 44)
ORANGE: Color = (255, 127, 14)

# A 5x7 bitmap font for the characters the chart writes (lower case is drawn as upper case).
_FONT_ROWS = {
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11110 10001 10001 10001 10001 10001 11110",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    " ": "00000 00000 00000 00000 00000 00000 00000", ".": "00000 00000 00000 00000 00000 01100 01100",
    ",": "00000 00000 00000 00000 01100 00100 01000", "-": "00000 00000 00000 11111 00000 00000 00000",
    ";": "00000 01100 01100 00000 01100 00100 01000",
    ":": "00000 01100 01100 00000 01100 01100 00000", "/": "00001 00001 00010 00100 01000 10000 10000",
    "(": "00010 00100 01000 01000 01000 00100 00010", ")": "01000 00100 00010 00010 00010 00100 01000",
    "%": "11000 11001 00010 00100 01000 10011 00011", "_": "00000 00000 00000 00000 00000 00000 11111",
    "=": "00000 00000 11111 00000 11111 00000 00000", ">": "01000 00100 00010 00001 00010 00100 01000",
    "<": "00010 00100 01000 10000 01000 00100 00010", "+": "00000 00100 00100 11111 00100 00100 00000",
    "'": "00100 00100 01000 00000 00000 00000 00000", "?": "01110 10001 00001 00010 00100 00000 00100",
}
FONT = {ch: [int(r, 2) for r in rows.split()] for ch, rows in _FONT_ROWS.items()}


@dataclass
class Canvas:
    width: int
    height: int
    pixels: bytearray = field(init=False)

    def __post_init__(self) -> None:
        self.pixels = bytearray(WHITE * (self.width * self.height))

    def dot(self, x: int, y: int, c: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i:i + 3] = bytes(c)

    def rect(self, x0: int, y0: int, x1: int, y1: int, c: Color) -> None:
        for y in range(max(0, y0), min(self.height, y1 + 1)):
            for x in range(max(0, x0), min(self.width, x1 + 1)):
                self.dot(x, y, c)

    def line(self, x0: float, y0: float, x1: float, y1: float, c: Color, width: int = 1, dash: int = 0) -> None:
        steps = max(1, int(max(abs(x1 - x0), abs(y1 - y0))))
        half = width // 2
        for i in range(steps + 1):
            if dash and (i // dash) % 2:
                continue
            x = round(x0 + (x1 - x0) * i / steps)
            y = round(y0 + (y1 - y0) * i / steps)
            for dx in range(-half, width - half):
                for dy in range(-half, width - half):
                    self.dot(x + dx, y + dy, c)

    def text(self, x: int, y: int, s: str, c: Color = BLACK, scale: int = 1) -> int:
        """Draws `s` with its top left at (x, y); returns the width drawn."""
        cx = x
        for ch in s.upper():
            rows = FONT.get(ch, FONT["?"])
            for r, bits in enumerate(rows):
                for col in range(5):
                    if bits & (1 << (4 - col)):
                        self.rect(cx + col * scale, y + r * scale, cx + col * scale + scale - 1,
                                  y + r * scale + scale - 1, c)
            cx += 6 * scale
        return cx - x

    @staticmethod
    def text_width(s: str, scale: int = 1) -> int:
        return 6 * scale * len(s)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[3 * self.width * y:3 * self.width * (y + 1)])
                       for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + \
            chunk(b"IEND", b"")


@dataclass
class Series:
    label: str
    points: Points
    color: Color
    dash: int = 0


def _nice_max(v: float) -> float:
    if v <= 0 or not math.isfinite(v):
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 4, 5, 8, 10):  # quarters of these read well: 0.25, 0.5, 1, 1.25, 2, 2.5
        if v <= m * exp:
            return m * exp
    return 10 * exp


def _fmt(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".") if v < 10 else f"{v:.0f}"


def panel(cv: Canvas, box: tuple[int, int, int, int], title: str, unit: str, series: Sequence[Series],
          t0: float, t1: float, phases: Sequence[tuple[float, str]]) -> None:
    x0, y0, x1, y1 = box
    cv.text(x0, y0 - 22, title, BLACK, 2)
    values = [v for s in series for _, v in s.points if v is not None and math.isfinite(v)]
    top = _nice_max(max(values, default=1.0) * 1.1)
    cv.rect(x0, y0, x1, y1, WHITE)
    for i in range(5):  # grid and y labels
        y = y1 - (y1 - y0) * i / 4
        cv.line(x0, y, x1, y, GREY)
        label = _fmt(top * i / 4)
        cv.text(x0 - 8 - cv.text_width(label), round(y) - 3, label, DARK)
    cv.text(x0 - 8 - cv.text_width(unit), y0 - 14 + 2, unit, DARK)
    span = max(1.0, t1 - t0)

    def px(t: float) -> float:
        return x0 + (x1 - x0) * (t - t0) / span

    def py(v: float) -> float:
        return y1 - (y1 - y0) * min(v, top) / top

    for t, name in phases:
        cv.line(px(t), y0, px(t), y1, DARK, 1, dash=4)
        cv.text(round(px(t)) + 3, y0 + 3, name, DARK)
    for s in series:
        prev: tuple[float, float] | None = None
        for t, v in s.points:
            if v is None or not math.isfinite(v):
                prev = None
                continue
            pt = (px(t), py(v))
            if prev is not None:
                cv.line(prev[0], prev[1], pt[0], pt[1], s.color, 2, s.dash)
            else:
                cv.dot(round(pt[0]), round(pt[1]), s.color)
            prev = pt
    cv.line(x0, y0, x0, y1, BLACK)
    cv.line(x0, y1, x1, y1, BLACK)
    for i in range(7):  # time axis, seconds since the start
        t = t0 + span * i / 6
        label = f"{round(t - t0)}S"
        cv.line(px(t), y1, px(t), y1 + 4, BLACK)
        cv.text(round(px(t)) - cv.text_width(label) // 2, y1 + 8, label, DARK)
    lx = x0 + 10
    for s in series:  # legend, under the plot
        cv.line(lx, y1 + 26, lx + 20, y1 + 26, s.color, 3, s.dash)
        lx += 26 + cv.text(lx + 26, y1 + 23, s.label, BLACK) + 20


def demo_chart(path: Path, *, tenant: str, ttft: Points, objective: float, reserved: Points, elastic: Points,
               phases: Sequence[tuple[float, str]], t0: float, t1: float, note: str) -> Path:
    """Writes the PNG and returns its path."""
    cv = Canvas(1200, 760)
    cv.text(40, 16, f"SPILLWAY DEMO: TENANT {tenant}", BLACK, 3)
    cv.text(40, 46, note, DARK)
    panel(cv, (110, 110, 1160, 360), "TTFT P99 VS OBJECTIVE", "SECONDS",
          [Series("TTFT P99 (PROMETHEUS, SLO WINDOW)", ttft, BLUE),
           Series(f"OBJECTIVE {_fmt(objective)} S", [(t0, objective), (t1, objective)], RED, dash=8)],
          t0, t1, phases)
    gib = 1 << 30
    panel(cv, (110, 460, 1160, 690), "PEER MEMORY HELD", "GIB",
          [Series("RESERVATION", [(t, None if v is None else v / gib) for t, v in reserved], GREEN),
           Series("ELASTIC (GROWN BY SLO FEEDBACK)", [(t, None if v is None else v / gib) for t, v in elastic],
                  ORANGE)],
          t0, t1, phases)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cv.png())
    return path
