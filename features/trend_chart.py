"""Inline-SVG charts for the quality report's trend panel: markup only, nothing to load.

A report has to open where there is no internet (inside a data platform's network), so
the chart is plain SVG written into the page rather than drawn by a charting script.
Every point and bar carries a ``<title>`` with its exact value, which browsers show on
hover. Days are evenly spaced categories (gaps in the calendar are not drawn).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 500, 210
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 10, 30
MAX_DAY_LABELS = 6
PALETTE = ("#1f5fa8", "#e07b00", "#2a9d5b", "#8e44ad", "#6b6b6b", "#c0392b")


def colors(count: int) -> tuple[str, ...]:
    """``count`` line colours, the palette repeated where there are more series than colours."""
    return tuple(PALETTE[i % len(PALETTE)] for i in range(count))


@dataclass(frozen=True)
class Series:
    """One line (or one layer of a stacked bar), a value or None (no data) per day."""

    name: str
    values: tuple[float | None, ...]
    color: str


@dataclass(frozen=True)
class Panel:
    """One chart: its series over the same days and how to scale and label them."""

    title: str
    unit: str  # after each value in tooltips: "rows", "%", "x", "expectations"
    series: tuple[Series, ...]
    log_scale: bool = False
    references: tuple[float, ...] = ()  # dashed horizontal lines (e.g. a warning band)
    bars: bool = False  # stacked bars instead of lines
    integer: bool = False  # counts: no fractional ticks
    note: str = ""  # one line under the chart saying what is drawn


def render(panel: Panel, days: Sequence[str], marked: Collection[int] = ()) -> str:
    """The panel as an ``<svg>`` element; ``marked`` day indexes get a red column (failed)."""
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / max(len(days), 1)

    def x(index: int) -> float:
        return LEFT + (index + 0.5) * step

    scale = _scale(panel, len(days))

    def y(value: float) -> float:
        return TOP + plot_h * (1 - scale.fraction(value))

    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}"'
        f' role="img" aria-label="{escape(panel.title)}">'
    ]
    for index in sorted(marked):
        parts.append(
            f'<rect class="failed-day" x="{LEFT + index * step:.1f}" y="{TOP}"'
            f' width="{step:.1f}" height="{plot_h}"><title>{escape(days[index])}: failed'
            "</title></rect>"
        )
    for tick in scale.ticks:
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(tick):.1f}"'
            f' y2="{y(tick):.1f}"/><text class="tick" x="{LEFT - 6}" y="{y(tick) + 4:.1f}"'
            f' text-anchor="end">{escape(_compact(tick))}</text>'
        )
    for reference in panel.references:
        parts.append(
            f'<line class="reference" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(reference):.1f}"'
            f' y2="{y(reference):.1f}"><title>{escape(_value(reference, panel.unit))}'
            "</title></line>"
        )
    every = math.ceil(len(days) / MAX_DAY_LABELS) or 1
    for index in range(0, len(days), every):
        parts.append(
            f'<text class="tick" x="{x(index):.1f}" y="{HEIGHT - BOTTOM + 16}"'
            f' text-anchor="middle">{escape(days[index])}</text>'
        )
    parts.append(
        f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}"'
        f' y2="{TOP + plot_h}"/>'
    )
    if panel.bars:
        parts.extend(_bars(panel, days, x, y, step))
    else:
        parts.extend(_lines(panel, days, x, y))
    parts.append("</svg>")
    return "".join(parts)


def _lines(
    panel: Panel, days: Sequence[str], x: Callable[[int], float], y: Callable[[float], float]
) -> list[str]:
    parts = []
    for series in panel.series:
        segment: list[str] = []
        for index, value in enumerate([*series.values, None]):
            if value is not None:
                segment.append(f"{x(index):.1f},{y(value):.1f}")
                continue
            if len(segment) > 1:
                parts.append(
                    f'<polyline fill="none" stroke="{series.color}" stroke-width="2"'
                    f' points="{" ".join(segment)}"/>'
                )
            segment = []
        for index, value in enumerate(series.values):
            if value is not None:
                parts.append(
                    f'<circle cx="{x(index):.1f}" cy="{y(value):.1f}" r="3.5"'
                    f' fill="{series.color}"><title>{escape(days[index])} · {escape(series.name)}'
                    f": {escape(_value(value, panel.unit))}</title></circle>"
                )
    return parts


def _bars(
    panel: Panel,
    days: Sequence[str],
    x: Callable[[int], float],
    y: Callable[[float], float],
    step: float,
) -> list[str]:
    parts = []
    width = min(step * 0.6, 28.0)
    for index in range(len(days)):
        bottom = 0.0
        for series in panel.series:
            value = series.values[index] or 0.0
            if value <= 0:
                continue
            top = bottom + value
            parts.append(
                f'<rect x="{x(index) - width / 2:.1f}" y="{y(top):.1f}" width="{width:.1f}"'
                f' height="{y(bottom) - y(top):.1f}" fill="{series.color}">'
                f"<title>{escape(days[index])} · {escape(series.name)}:"
                f" {escape(_value(value, panel.unit))}</title></rect>"
            )
            bottom = top
    return parts


@dataclass(frozen=True)
class _Scale:
    low: float
    high: float
    log: bool
    ticks: tuple[float, ...]

    def fraction(self, value: float) -> float:
        if self.log:
            value = max(value, self.low)
            return (math.log10(value) - math.log10(self.low)) / (
                math.log10(self.high) - math.log10(self.low)
            )
        return (value - self.low) / (self.high - self.low)


def _scale(panel: Panel, days: int) -> _Scale:
    if panel.bars:
        values = [sum(s.values[i] or 0.0 for s in panel.series) for i in range(days)]
    else:
        values = [v for s in panel.series for v in s.values if v is not None]
    values += list(panel.references)
    if panel.log_scale:
        positive = [v for v in values if v > 0] or [1.0]
        low, high = min(positive) / 1.5, max(positive) * 1.5
        ticks = tuple(
            t
            for exponent in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
            for t in (10.0**exponent, 2 * 10.0**exponent, 5 * 10.0**exponent)
            if low <= t <= high
        )
        return _Scale(low, high, True, ticks)
    top = max([0.0, *values])
    step = _nice_step(top / 4 if top > 0 else 0.25)
    if panel.integer:
        step = max(step, 1.0)
    high = max(math.ceil(top / step), 1) * step
    return _Scale(0.0, high, False, tuple(i * step for i in range(round(high / step) + 1)))


def _nice_step(raw: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``raw``."""
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)


def _compact(value: float) -> str:
    for size, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:g}{suffix}"
    return f"{value:g}"


def _value(value: float, unit: str) -> str:
    if unit == "%":
        return f"{value:.2f}%"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:,.0f} {unit}"
