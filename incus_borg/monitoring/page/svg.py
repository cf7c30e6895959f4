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


def bars(series: Sequence[Sequence[float | None]], label: str) -> str:
    """Bars per run, the runs evenly spaced (oldest left), for one or more series side by
    side (classes `s0`, `s1`, ...), all on the scale of the largest value; None: no bar."""
    height = 50
    slots = max((len(values) for values in series), default=0)
    top = max((v for values in series for v in values if v is not None), default=0.0) or 1.0
    slot = WIDTH / max(slots, 1)
    width = min(slot * 0.7 / max(len(series), 1), 40.0)
    shapes = []
    for k, values in enumerate(series):
        for n, value in enumerate(values):
            if value is None:
                continue
            x = round(n * slot + (slot - width * len(series)) / 2 + k * width, 1)
            h = max(round(value / top * (height - 4), 1), 1.0 if value else 0.0)
            shapes.append(
                f'<rect class="s{k}" x="{x}" y="{height - h}" width="{round(width, 1)}" '
                f'height="{h}"><title>{value:g}</title></rect>'
            )
    return _svg(height, "plot", label, shapes)
