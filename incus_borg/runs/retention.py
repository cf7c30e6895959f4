"""Which of incus-borg's runs `prune` keeps: a pure function of the runs and the policy.

- Complete runs are kept by the policy (Borg's prune rules: the newest run of each of the
  last `keep_daily` days, `keep_weekly` weeks and `keep_monthly` months that have one).
- A partial run never takes a complete run's place. Once a complete run newer than it is
  kept, it is deleted; until then, the partial runs form a series of their own under the
  same policy (so that a repository holding only partial runs, as `instances:` makes them,
  is pruned too).
- An incomplete run (what an interrupted run left) is deleted once it is older than the
  newest complete run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from ..config import Retention
from .archives import COMPLETE, INCOMPLETE, PARTIAL, Run

PERIODS: dict[str, Callable[[datetime], str]] = {
    "keep_daily": lambda t: t.strftime("%Y-%m-%d"),
    "keep_weekly": lambda t: t.strftime("%G-%V"),
    "keep_monthly": lambda t: t.strftime("%Y-%m"),
}


@dataclass
class Selection:
    """The runs `prune` keeps and deletes, oldest first, each with the reason."""

    keep: list[tuple[Run, str]] = field(default_factory=list)
    delete: list[tuple[Run, str]] = field(default_factory=list)


def to_keep(runs: dict[str, datetime], retention: Retention) -> dict[str, str]:
    """The runs to keep and the rule keeping each (Borg's prune rules, newest first)."""
    kept: dict[str, str] = {}
    newest_first = sorted(runs, key=runs.__getitem__, reverse=True)
    for rule, period_of in PERIODS.items():
        wanted = getattr(retention, rule)
        count, last = 0, None
        for name in newest_first:
            if count >= wanted:
                break
            period = period_of(runs[name])
            if period == last:
                continue
            last = period
            if name not in kept:
                kept[name] = rule
                count += 1
    return kept


def select(runs: list[Run], retention: Retention) -> Selection:
    """Apply the policy to incus-borg's runs, whose states are known (see runs.resolve);
    other runs are left out of both lists."""
    complete = {r.name: r.start for r in runs if r.state == COMPLETE}
    kept = to_keep(complete, retention)
    newest_kept = max((complete[name] for name in kept), default=None)
    recent = {
        r.name: r.start
        for r in runs
        if r.state == PARTIAL and (newest_kept is None or r.start > newest_kept)
    }
    kept_partial = to_keep(recent, retention)
    newest = max(complete.values(), default=None)
    chosen = Selection()
    for run in sorted(runs, key=lambda r: r.start):
        if run.state == COMPLETE:
            verdict = (run.name in kept, kept.get(run.name, "beyond the retention"))
        elif run.state == PARTIAL and run.name in recent:
            rule = kept_partial.get(run.name, "beyond the retention")
            verdict = (run.name in kept_partial, f"partial run, {rule}")
        elif run.state == PARTIAL:
            verdict = (False, "partial run older than a kept complete run")
        elif run.state == INCOMPLETE and newest is not None and run.start < newest:
            verdict = (False, "incomplete run older than the newest complete run")
        elif run.state == INCOMPLETE:
            verdict = (True, "incomplete run, no complete run is newer")
        else:
            continue
        (chosen.keep if verdict[0] else chosen.delete).append((run, verdict[1]))
    return chosen
