"""Charts as self-contained SVG text: a bar chart (scores per task type) and a line chart
(a training loss), drawn with the standard library only, so that any stage's environment
can write one and any browser, `dvc plots show` included, shows it offline.

The same data give the same bytes: coordinates are written with fixed decimals, nothing
depends on the machine (no fonts are measured; text widths are estimated from lengths).

    bar_chart([("generation", 0.42), ("ranking", 0.9)], title="ShopBench score per task type")
    line_chart(series_from_csv("loss.csv", "step", ["loss"]), title="Training loss",
               x_label="step", y_label="loss")
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

FONT = 'font-family="Helvetica, Arial, sans-serif"'
CHAR_WIDTH = 7.0  # px per character at 12 px, a generous estimate for sans-serif text
COLORS = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2")


def _number(value: float) -> str:
    """A coordinate with at most one decimal, the same text on every machine."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _label(value: float) -> str:
    """A tick or value label: up to 4 significant digits, no exponent for everyday values."""
    if value == 0:
        return "0"
    text = f"{value:.4g}"
    return text if "e" not in text else f"{value:.2e}"


def _svg(width: float, height: float, title: str, body: list[str]) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_number(width)}" height="{_number(height)}" '
        f'viewBox="0 0 {_number(width)} {_number(height)}" role="img">'
    )
    return "\n".join(
        [
            head,
            f"<title>{escape(title)}</title>",
            f'<rect width="{_number(width)}" height="{_number(height)}" fill="white"/>',
            f'<text x="{_number(width / 2)}" y="22" text-anchor="middle" font-size="15" font-weight="bold" {FONT}>'
            f"{escape(title)}</text>",
            *body,
            "</svg>",
            "",
        ]
    )


def nice_ticks(low: float, high: float, count: int = 5, whole: bool = False) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten apart, whole numbers apart if
    `whole`), at most count + 1 of them, covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("ticks need finite bounds")
    if high < low:
        low, high = high, low
    if high == low:
        pad = abs(high) * 0.1 or 1.0
        low, high = low - pad, high + pad
    power = 10 ** math.floor(math.log10((high - low) / count))
    power = max(power, 1) if whole else power
    for step in (m * power for m in (1, 2, 2.5, 5, 10, 20)):
        if whole and step != int(step):
            continue
        first = math.floor(low / step + 1e-9)
        last = max(math.ceil(high / step - 1e-9), first + 1)
        if last - first <= count:
            break
    return [round(i * step, 12) + 0.0 for i in range(first, last + 1)]


def bar_chart(items: Sequence[tuple[str, float]], title: str, maximum: float = 1.0, value_label: str = "score") -> str:
    """Horizontal bars, one per (label, value), in the order given, on a 0..maximum axis."""
    if not items:
        raise ValueError("a bar chart needs at least one bar")
    if not all(math.isfinite(value) for _, value in items):
        raise ValueError("bar values must be finite numbers")
    top = max([maximum, *(value for _, value in items)])
    label_width = max(len(label) for label, _ in items) * CHAR_WIDTH + 16
    plot_x, plot_width, row, y0 = label_width, 360.0, 30.0, 44.0
    width = plot_x + plot_width + 70
    height = y0 + row * len(items) + 46
    body = []
    for tick in nice_ticks(0.0, top):
        if tick > top + 1e-12:
            break
        x = plot_x + plot_width * tick / top
        body.append(
            f'<line x1="{_number(x)}" y1="{_number(y0 - 4)}" x2="{_number(x)}" '
            f'y2="{_number(y0 + row * len(items))}" stroke="#dddddd"/>'
        )
        body.append(
            f'<text x="{_number(x)}" y="{_number(y0 + row * len(items) + 16)}" text-anchor="middle" '
            f'font-size="11" fill="#555555" {FONT}>{_label(tick)}</text>'
        )
    for i, (label, value) in enumerate(items):
        y = y0 + row * i
        bar = plot_width * max(value, 0.0) / top
        body.append(
            f'<text x="{_number(plot_x - 8)}" y="{_number(y + row / 2 + 4)}" text-anchor="end" '
            f'font-size="12" {FONT}>{escape(label)}</text>'
        )
        body.append(
            f'<rect x="{_number(plot_x)}" y="{_number(y + 5)}" width="{_number(bar)}" '
            f'height="{_number(row - 10)}" fill="{COLORS[0]}"><title>{escape(label)}: {value:.4f}</title></rect>'
        )
        body.append(
            f'<text x="{_number(plot_x + bar + 6)}" y="{_number(y + row / 2 + 4)}" font-size="12" {FONT}>'
            f"{value:.4f}</text>"
        )
    body.append(
        f'<text x="{_number(plot_x + plot_width / 2)}" y="{_number(height - 8)}" text-anchor="middle" '
        f'font-size="12" fill="#555555" {FONT}>{escape(value_label)}</text>'
    )
    return _svg(width, height, title, body)


def line_chart(
    series: dict[str, Sequence[tuple[float, float]]], title: str, x_label: str = "x", y_label: str = "y"
) -> str:
    """One line per named series of (x, y) points (non-finite points left out), with a legend
    when there are several series."""
    clean = {
        name: [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]
        for name, points in series.items()
    }
    points = [p for values in clean.values() for p in values]
    if not points:
        raise ValueError("a line chart needs at least one finite point")
    xs = [x for x, _ in points]
    x_ticks = nice_ticks(min(xs), max(xs), count=6, whole=all(x == int(x) for x in xs))
    y_ticks = nice_ticks(min(y for _, y in points), max(y for _, y in points))
    plot_x, plot_y, plot_width, plot_height = 70.0, 40.0, 480.0, 260.0
    width, height = plot_x + plot_width + 30, plot_y + plot_height + 60

    def sx(x: float) -> float:
        return plot_x + plot_width * (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0])

    def sy(y: float) -> float:
        return plot_y + plot_height * (1 - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]))

    body = []
    for tick in x_ticks:
        body.append(
            f'<line x1="{_number(sx(tick))}" y1="{_number(plot_y)}" x2="{_number(sx(tick))}" '
            f'y2="{_number(plot_y + plot_height)}" stroke="#eeeeee"/>'
        )
        body.append(
            f'<text x="{_number(sx(tick))}" y="{_number(plot_y + plot_height + 16)}" text-anchor="middle" '
            f'font-size="11" fill="#555555" {FONT}>{_label(tick)}</text>'
        )
    for tick in y_ticks:
        body.append(
            f'<line x1="{_number(plot_x)}" y1="{_number(sy(tick))}" x2="{_number(plot_x + plot_width)}" '
            f'y2="{_number(sy(tick))}" stroke="#eeeeee"/>'
        )
        body.append(
            f'<text x="{_number(plot_x - 6)}" y="{_number(sy(tick) + 4)}" text-anchor="end" '
            f'font-size="11" fill="#555555" {FONT}>{_label(tick)}</text>'
        )
    body.append(
        f'<rect x="{_number(plot_x)}" y="{_number(plot_y)}" width="{_number(plot_width)}" '
        f'height="{_number(plot_height)}" fill="none" stroke="#999999"/>'
    )
    for i, (name, values) in enumerate(clean.items()):
        color = COLORS[i % len(COLORS)]
        coordinates = " ".join(f"{_number(sx(x))},{_number(sy(y))}" for x, y in values)
        if len(values) > 1:
            body.append(f'<polyline points="{coordinates}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y in values if len(values) <= 60 else values[-1:]:
            body.append(
                f'<circle cx="{_number(sx(x))}" cy="{_number(sy(y))}" r="2.5" fill="{color}">'
                f"<title>{escape(name)}: {_label(x)}, {_label(y)}</title></circle>"
            )
        if len(clean) > 1:
            y = plot_y + 14 + 16 * i
            body.append(
                f'<line x1="{_number(plot_x + plot_width - 120)}" y1="{_number(y - 4)}" '
                f'x2="{_number(plot_x + plot_width - 100)}" y2="{_number(y - 4)}" stroke="{color}" stroke-width="2"/>'
            )
            body.append(
                f'<text x="{_number(plot_x + plot_width - 94)}" y="{_number(y)}" font-size="11" {FONT}>'
                f"{escape(name)}</text>"
            )
    body.append(
        f'<text x="{_number(plot_x + plot_width / 2)}" y="{_number(height - 14)}" text-anchor="middle" '
        f'font-size="12" fill="#555555" {FONT}>{escape(x_label)}</text>'
    )
    body.append(
        f'<text x="16" y="{_number(plot_y + plot_height / 2)}" text-anchor="middle" font-size="12" fill="#555555" '
        f'transform="rotate(-90 16 {_number(plot_y + plot_height / 2)})" {FONT}>{escape(y_label)}</text>'
    )
    return _svg(width, height, title, body)


def series_from_csv(path: str | Path, x: str, ys: Sequence[str]) -> dict[str, list[tuple[float, float]]]:
    """Columns of a CSV file with a header as line-chart series: {y: [(x, y), ...]}; empty
    cells are left out (e.g. a validation loss logged every few steps)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    missing = [name for name in (x, *ys) if rows and name not in rows[0]]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)}")
    return {
        y: [(float(row[x]), float(row[y])) for row in rows if row[x] not in ("", None) and row[y] not in ("", None)]
        for y in ys
    }
