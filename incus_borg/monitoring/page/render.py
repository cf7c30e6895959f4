"""The report page, rendered from the states of the server's instances and the runs of the
local index: report.html is the template, report.css its style, svg.py the plots."""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from importlib import resources

from ...backup import groups
from .. import coverage
from ..coverage import Standing, age_text, size_text
from ..index import Run
from . import svg

DAY = 86400
MAX_RUNS = 100  # rows of the runs table


@dataclass
class Page:
    """What the page shows."""

    host: str
    now: float
    days: int
    ages: dict[str, float]  # max_age of each repository shown, in seconds
    items: list[Standing]  # on the server
    gone: list[Standing]  # held by runs, no longer on the server
    runs: list[Run]  # held in the repositories shown, oldest first

    @property
    def start(self) -> float:
        """The beginning of the timelines."""
        return self.now - self.days * DAY

    @property
    def recent(self) -> list[Run]:
        """The runs within the timelines, oldest first."""
        return [run for run in self.runs if run.time >= self.start]


def _resource(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def render(page: Page) -> str:
    """The whole page."""
    limits = ", ".join(f"{escape(r)} {age_text(a)}" for r, a in page.ages.items())
    return string.Template(_resource("report.html")).substitute(
        host=escape(page.host),
        style=_resource("report.css"),
        meta=f"{escape(coverage.iso(page.now))} &middot; max_age: {limits}",
        summary=summary(page.items),
        status=status_table(page),
        days=page.days,
        timeline=timeline(page),
        repositories=repositories(page),
        runs=runs_section(page),
        refresh_hint="runs made elsewhere appear after <code>incus-borg status --refresh</code>",
    )


def badge(state: str) -> str:
    """A state, coloured."""
    return f'<span class="badge {escape(state)}">{escape(state)}</span>'


def summary(items: list[Standing]) -> str:
    """One chip per state, with its count."""
    chips = []
    for state, count in coverage.counts(items).items():
        zero = " zero" if not count else ""
        chips.append(f'<div class="chip {state}{zero}"><b>{count}</b>{state}</div>')
    return "".join(chips)


def _cells(values: Sequence[tuple[str, str]], heads: int = 0) -> str:
    """Table cells holding HTML, each labelled (shown before it on narrow screens, where the
    first `heads` cells make the card's title line instead)."""
    cells = []
    for k, (label, html) in enumerate(values):
        css = ' class="head"' if k < heads else ""
        cells.append(
            f'<td{css} data-label="{escape(label)}"><span>{html}</span></td>'
            if html
            else "<td></td>"
        )
    return "".join(cells)


def _table(headers: Sequence[str], rows: list[str], css: str = "cards") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return (
        f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


PROBLEMS_FIRST = (coverage.FAILED, coverage.NEVER, coverage.STALE, coverage.OK, coverage.SKIPPED)
STATUS_HEADERS = ("State", "Name", "Kind", "Newest run", "Age", "Repositories", "Window")


def status_row(s: Standing, now: float) -> str:
    """One instance or volume as the status table shows it."""
    age = s.age(now)
    window = s.entry.window if s.entry else None
    why = f'<span class="why">{escape(s.reason)}</span>' if s.reason else ""
    values = [
        ("State", badge(s.state or "GONE")),
        (
            "Name",
            f'<b class="name">{escape(s.ref)}</b> <small class="narrow">{s.kind}</small>{why}',
        ),
        ("Kind", escape(s.kind)),
        ("Newest run", f'<span class="run">{escape(s.run.run)}</span>' if s.run else "-"),
        ("Age", f'<span class="num">{age_text(age)}</span>' if age is not None else "-"),
        ("Repositories", escape(", ".join(s.repositories)) or "-"),
        ("Window", f'<span class="num">{window:.2f} s</span>' if window is not None else "-"),
    ]
    css = "" if s.exists else ' class="gone"'
    return f"<tr{css}>{_cells(values, heads=2)}</tr>"


def problems_first(items: list[Standing]) -> list[Standing]:
    """FAILED, NEVER and STALE first, then OK and SKIPPED; by name within a state."""
    order = {state: k for k, state in enumerate(PROBLEMS_FIRST)}
    return sorted(items, key=lambda s: (order[s.state], s.kind, s.ref))


def status_table(page: Page) -> str:
    """Every instance and volume, the problems first; then what is gone."""
    rows = [status_row(s, page.now) for s in problems_first(page.items) + page.gone]
    note = (
        '<p class="note">GONE: no longer on this server; its newest run can restore it.</p>'
        if page.gone
        else ""
    )
    return _table(STATUS_HEADERS, rows) + note


def timeline(page: Page) -> str:
    """A row of marks per instance and volume: one per run in the last days."""
    threshold = page.now - min(page.ages.values(), default=0.0)
    marks: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for run in page.recent:
        for entry in run.items:
            marks.setdefault(entry.key, []).append(
                (run.time, "ok" if entry.failed is None else "failed")
            )
    thirds = [f"{page.days * k // 3}d ago" for k in (3, 2, 1)] + ["now"]
    axis = "".join(f"<span>{label}</span>" for label in thirds)
    rows = ['<div class="axis-spacer"></div>', f'<div class="axis">{axis}</div>']
    for s in problems_first(page.items):
        found = marks.get((s.kind, s.ref), [])
        label = f"{s.ref}: {len(found)} run(s) in {page.days} days, {s.state}"
        rows.append(f'<div class="tl-name"><b>{escape(s.ref)}</b>{badge(s.state)}</div>')
        rows.append(svg.timeline(found, page.start, page.now, threshold, label))
    legend = (
        '<div class="legend"><span><i class="OK"></i>held by the run</span>'
        '<span><i class="FAILED"></i>left out of the run</span>'
        '<span><i class="STALE"></i>dashed: max_age ago</span></div>'
    )
    return legend + f'<div class="timeline">{"".join(rows)}</div>'


def repositories(page: Page) -> str:
    """Per repository: its size after each run, and what each run added (the runs of the
    last days, evenly spaced, oldest left)."""
    cards = []
    for repo in page.ages:
        runs = [run for run in page.recent if repo in run.repositories]
        stored = [run.repositories[repo] for run in runs]
        sizes = [float(s.size) if s.size is not None else None for s in stored]
        added = [float(s.added) if s.added is not None else None for s in stored]
        if not any(v is not None for v in sizes + added):
            body = '<p class="note">No figures yet: runs found by a refresh carry none.</p>'
        else:
            span = _span(runs)
            body = _chart(
                "size",
                f"size after each run, now {size_text(_last(sizes))}",
                f"max {size_text(_top(sizes))}",
                svg.bars([sizes], f"{repo}: size after each run"),
                span,
            ) + _chart(
                "growth",
                "added per run (deduplicated)",
                f"max {size_text(_top(added))}",
                svg.bars([added], f"{repo}: added per run"),
                span,
            )
        cards.append(
            f'<div class="card"><h3>{escape(repo)}</h3>'
            f'<p class="note">{len(runs)} run(s) in {page.days} days</p>{body}</div>'
        )
    return f'<div class="repos">{"".join(cards)}</div>'


def _last(values: list[float | None]) -> int | None:
    known = [v for v in values if v is not None]
    return int(known[-1]) if known else None


def _top(values: list[float | None]) -> int | None:
    known = [v for v in values if v is not None]
    return int(max(known)) if known else None


def _span(runs: list[Run]) -> tuple[str, str]:
    """The first and last run's dates, under a plot of runs."""
    first, last = (coverage.iso(r.time)[:16].replace("T", " ") for r in (runs[0], runs[-1]))
    return first, last


def _chart(css: str, left: str, right: str, plot: str, span: tuple[str, str]) -> str:
    return (
        f'<div class="chart {css}"><div class="label"><span>{escape(left)}</span>'
        f"<span>{escape(right)}</span></div>{plot}"
        f'<div class="label"><span>{escape(span[0])}</span><span>{escape(span[1])}</span></div>'
        "</div>"
    )


RUN_HEADERS = ("Run", "Mode", "Daemon down", "Longest window", "Windows", "Groups", "Stored")


def run_row(run: Run) -> str:
    """One run: when, how, how long the daemon and the instances were held, and where."""
    windows = sorted(
        ((e.window, e) for e in run.items if e.window is not None), key=lambda p: -p[0]
    )
    longest = (
        f'<span class="num">{windows[0][0]:.2f} s</span> {escape(windows[0][1].name)}'
        if windows
        else "-"
    )
    listed = "".join(f"<li>{escape(e.key[1])}: {w:.2f} s</li>" for w, e in windows)
    detail = f"<details><summary>{len(windows)}</summary><ul>{listed}</ul></details>"
    stored = "; ".join(
        f"{escape(name)}: {size_text(s.bytes_read)} read, {size_text(s.added)} added"
        if s.bytes_read is not None
        else escape(name)
        for name, s in run.repositories.items()
    )
    down = run.daemon_downtime
    when = escape(coverage.iso(run.time)[:16].replace("T", " "))
    values = [
        ("Run", f'<span class="run">{escape(run.run)}</span><br><small>{when}</small>'),
        ("Mode", escape(run.mode + (" (hook)" if run.hook_mode else ""))),
        ("Daemon down", f'<span class="num">{down:.2f} s</span>' if down is not None else "-"),
        ("Longest window", f'<span class="wrap">{longest}</span>'),
        ("Windows", detail if windows else "-"),
        ("Groups", group_cell(run)),
        ("Stored", f'<span class="wrap">{stored or "hook (not refreshed)"}</span>'),
    ]
    return f"<tr>{_cells(values, heads=1)}</tr>"


def group_cell(run: Run) -> str:
    """A run's consistency groups: each one's members, moment and window."""
    if not run.groups:
        return "-"
    listed = "".join(f"<li>{escape(groups.done(g))}</li>" for g in run.groups)
    return f'<ul class="wrap">{listed}</ul>'


def runs_section(page: Page) -> str:
    """Daemon downtime and the longest quiesce window per run, plotted; then the runs."""
    recent = page.recent
    if not recent:
        return f'<p class="note">No run in the last {page.days} days.</p>'
    downtime = [r.daemon_downtime for r in recent]
    longest = [
        max((e.window for e in r.items if e.window is not None), default=None) for r in recent
    ]
    top = max([v for v in downtime + longest if v is not None], default=0.0)
    plot = _chart(
        "pauses",
        "daemon downtime (brown), longest quiesce window (orange) per run",
        f"max {top:.2f} s",
        svg.bars([downtime, longest], "pauses per run"),
        _span(recent),
    )
    rows = [run_row(run) for run in reversed(recent[-MAX_RUNS:])]
    more = len(recent) - MAX_RUNS
    note = f'<p class="note">{more} older run(s) not listed.</p>' if more > 0 else ""
    return plot + _table(RUN_HEADERS, rows) + note
