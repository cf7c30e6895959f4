"""Inline SVG plots for the report: shapes only, stretched to the page's width
(`preserveAspectRatio="none"`, strokes that do not scale); every text stays in HTML, so it
reads the same on a phone and on a desktop."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

WIDTH = 1000  # the viewBox's width: time runs from 0 to WIDTH
MARK = 5  # a run's mark, in viewBox units


def _x(when: float, start: float, end: float) -> float:
    return round((when - start) / max(end - start, 1.0) * WIDTH, 1)


def _svg(height: int, css: str, label: str, shapes: list[str]) -> str:
    return (
        f'<svg class="{css}" viewBox="0 0 {WIDTH} {height}" preserveAspectRatio="none" '
        f'height="{height}" role="img" aria-label="{escape(label)}">' + "".join(shapes) + "</svg>"
    )


def _rule(x: float, height: int, css: str) -> str:
    return (
        f'<line class="{css}" x1="{x}" x2="{x}" y1="0" y2="{height}" '
        'vector-effect="non-scaling-stroke"/>'
    )


def timeline(
    marks: Sequence[tuple[float, str]], start: float, end: float, threshold: float, label: str
) -> str:
    """One mark per run (`state` picks its colour class `m-<state>`) between `start` and
    `end`; a dashed rule at `threshold` (older runs are past max_age)."""
    height = 22
    shapes = []
    if start < threshold < end:
        shapes.append(_rule(_x(threshold, start, end), height, "limit"))
    for when, state in marks:
        x = min(max(_x(when, start, end) - MARK / 2, 0), WIDTH - MARK)
        shapes.append(
            f'<rect class="m-{state}" x="{x}" y="3" width="{MARK}" height="{height - 6}">'
            f"<title>{escape(state)}</title></rect>"
        )
    return _svg(height, "tl-bar", label, shapes)


def area(points: Sequence[tuple[float, float]], start: float, end: float, label: str) -> str:
    """A line and the area below it (for a size that grows), scaled to its largest value."""
    height = 70
    top = max((v for _, v in points), default=0.0) or 1.0
    coords = [(_x(t, start, end), round(height - 4 - v / top * (height - 8), 1)) for t, v in points]
    shapes = []
    if coords:
        line = " ".join(f"{x},{y}" for x, y in coords)
        fill = f"{coords[0][0]},{height} {line} {coords[-1][0]},{height}"
        shapes.append(f'<polygon class="area" points="{fill}"/>')
        shapes.append(
            f'<polyline class="line" points="{line}" vector-effect="non-scaling-stroke"/>'
        )
        shapes += [
            f'<rect class="dot" x="{x - 2}" y="{y - 2}" width="4" height="4"/>' for x, y in coords
        ]
    return _svg(height, "plot", label, shapes)


def bars(
    series: Sequence[Sequence[tuple[float, float]]], start: float, end: float, label: str
) -> str:
    """Bars per run for one or more series (side by side, classes `s0`, `s1`, ...), all on
    the scale of the largest value."""
    height = 50
    top = max((v for points in series for _, v in points), default=0.0) or 1.0
    shapes = []
    for k, points in enumerate(series):
        for when, value in points:
            x = min(max(_x(when, start, end) - MARK + k * MARK, 0), WIDTH - MARK)
            h = max(round(value / top * (height - 4), 1), 1.0 if value else 0.0)
            shapes.append(
                f'<rect class="s{k}" x="{x}" y="{height - h}" width="{MARK}" height="{h}"/>'
            )
    return _svg(height, "plot", label, shapes)
