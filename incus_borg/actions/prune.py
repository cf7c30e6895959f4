"""`incus-borg prune`: apply the retention to incus-borg's runs only, then compact.

A run is its server archive and its per-instance parts; they are kept or deleted together.
Archives made by anything else (a shared borgmatic repository) are never touched.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import click

from .. import layout
from ..borg import Borg, compact_argv, delete_argv, list_argv, list_comments_argv
from ..config import Repository, Retention
from ..context import Context
from ..errors import Warnings

PERIODS: dict[str, Callable[[datetime], str]] = {
    "keep_daily": lambda t: t.strftime("%Y-%m-%d"),
    "keep_weekly": lambda t: t.strftime("%G-%V"),
    "keep_monthly": lambda t: t.strftime("%Y-%m"),
}


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


def runs_of(borg: Borg, repo: Repository) -> tuple[dict[str, datetime], dict[str, list[str]]]:
    """incus-borg's runs (name -> time) and each run's part archives."""
    ours = {
        name
        for name, _, comment in (
            line.partition("\t")
            for line in borg.run(list_comments_argv(repo), repo).stdout.splitlines()
        )
        if comment == layout.RUN_COMMENT
    }
    archives = borg.run(list_argv(repo), repo).json()["archives"]
    runs = {
        a["name"]: datetime.fromisoformat(a["start"])
        for a in archives
        if a["name"] in ours and not layout.is_part(a["name"])
    }
    parts: dict[str, list[str]] = {name: [] for name in runs}
    for name in ours:
        if layout.is_part(name) and layout.run_of(name) in parts:
            parts[layout.run_of(name)].append(name)
    return runs, parts


def run(ctx: Context, label: str | None, dry_run: bool) -> int:
    """Prune every selected repository; returns the exit code."""
    config, borg = ctx.config, ctx.borg()
    warnings = Warnings()
    for repo in config.select_repositories(label):
        retention = repo.retention or config.retention
        runs, parts = runs_of(borg, repo)
        kept = to_keep(runs, retention)
        doomed = sorted(set(runs) - set(kept), key=runs.__getitem__)
        for name in sorted(kept, key=runs.__getitem__):
            click.echo(f"repository {repo.name}: keeping {name} ({kept[name]})")
        for name in doomed:
            click.echo(
                f"repository {repo.name}: {'would delete' if dry_run else 'deleting'} {name}"
            )
        if dry_run or not doomed:
            continue
        borg.run(delete_argv(repo, [a for name in doomed for a in (*parts[name], name)]), repo)
        if repo.append_only:
            warnings.add(
                f"repository {repo.name} is append-only: the deleted runs stay recoverable and "
                "their space is reclaimed only when the server's owner compacts it"
            )
        else:
            borg.run(compact_argv(repo), repo)
            click.echo(f"repository {repo.name}: compacted")
    return warnings.exit_code
