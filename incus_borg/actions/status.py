"""`incus-borg status`: is every instance and custom volume on this server backed up, and how
old is its newest run? From the live list of the server and the local index alone (no borg
call), so it is fast; `--refresh` first brings the index up to date from the repositories
(one `borg list` per repository, one manifest read per run it does not know yet).

Exit 0 when everything is OK or SKIPPED, 1 when anything is STALE, NEVER or FAILED (so it
works as a monitoring check), 2 on error.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

import click

from .. import monitoring, runs
from ..backup import groups
from ..borg import Borg
from ..config import Repository
from ..context import Context
from ..errors import UserError, Warnings
from ..manifest import Group, Manifest
from ..monitoring import coverage
from ..monitoring.coverage import Standing
from ..monitoring.index import Index, Run, Stored


@dataclass
class StatusOptions:
    """What `status` was asked for."""

    label: str | None = None
    as_json: bool = False
    refresh: bool = False


@dataclass
class Report:
    """Every instance and volume on the server with its state, and what runs hold of what
    is gone."""

    items: list[Standing]
    gone: list[Standing]
    ages: dict[str, float]  # max_age of each repository, in seconds
    now: float
    groups: list[Group] = field(default_factory=list)  # each as its newest run held it

    @property
    def exit_code(self) -> int:
        """0 when everything is OK or SKIPPED, else 1."""
        return coverage.exit_code(self.items)


def assess(ctx: Context, label: str | None) -> Report:
    """The state of everything on the server now, from the local index."""
    live = coverage.live_items(ctx.incus(), ctx.config.instances)
    index = monitoring.index_file(ctx).load()
    ages = coverage.limits(ctx.config, label)
    now = time.time()
    return Report(
        coverage.assess(live, index, ages, now),
        coverage.gone(live, index, ages),
        ages,
        now,
        index.groups(),
    )


def run(ctx: Context, options: StatusOptions) -> int:
    """Print the state of every instance and volume; returns the exit code."""
    warnings = Warnings()
    if options.refresh:
        refresh(ctx, options.label, warnings)
    report = assess(ctx, options.label)
    code = max(report.exit_code, warnings.exit_code)
    if options.as_json:
        click.echo(json.dumps(to_json(report, code), indent=2))
    else:
        show(report)
    return code


def to_json(report: Report, code: int) -> dict[str, Any]:
    """What `status --json` prints."""
    return {
        "member": monitoring.this_member(),
        "time": coverage.iso(report.now),
        "max_age": report.ages,
        "counts": coverage.counts(report.items),
        "items": [s.to_json(report.now) for s in report.items],
        "gone": [s.to_json(report.now) for s in report.gone],
        "groups": [dataclasses.asdict(g) for g in report.groups],
        "exit_code": code,
    }


# --- the table -------------------------------------------------------------------------------

HEADERS = [
    "STATE",
    "KIND",
    "NAME",
    "NEWEST RUN",
    "AGE",
    "REPOSITORIES",
    "READ",
    "ADDED",
    "WINDOW",
    "READER",
]


def row(s: Standing, now: float) -> list[str]:
    """One line of the table."""
    age = s.age(now)
    read, added = s.figures()
    window = s.entry.window if s.entry else None
    return [
        s.state or "-",
        s.kind,
        s.ref,
        s.run.run if s.run else "-",
        coverage.age_text(age) if age is not None else "-",
        ",".join(s.repositories) or "-",
        coverage.size_text(read),
        coverage.size_text(added),
        f"{window:.2f}s" if window is not None else "-",
        s.entry.reader if s.entry else "-",
    ]


def table(rows: list[list[str]]) -> list[str]:
    """Rows as aligned columns (the first row is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def show(report: Report) -> None:
    """The human-readable status."""
    rows = [HEADERS] + [row(s, report.now) for s in report.items]
    for line in table(rows):
        click.echo(line)
    for s in report.items:
        if s.state != coverage.OK and s.reason:
            click.echo(f"{s.state}: {s.kind} {s.ref}: {s.reason}")
    counted = coverage.counts(report.items)
    click.echo(", ".join(f"{n} {state}" for state, n in counted.items() if n) or "nothing")
    click.echo("(READ and ADDED are the whole run's: Borg counts per archive)")
    for group in report.groups:
        click.echo(groups.done(group))
    if report.gone:
        click.echo("\nNot on this server any more (a restore can bring them back):")
        for line in table([HEADERS[1:6]] + [row(s, report.now)[1:6] for s in report.gone]):
            click.echo(line)


# --- refresh ---------------------------------------------------------------------------------


@dataclass
class Found:
    """What one repository holds that the index should know."""

    repository: str
    archives: set[str]  # every archive in it now
    read: list[tuple[str, Manifest | None]]  # archives new to the index, with their manifest


def refresh(ctx: Context, label: str | None, warnings: Warnings) -> None:
    """Bring the index up to date with the repositories: forget what they no longer hold,
    read the manifest of every run (or other program's archive) it does not know yet."""
    borg = ctx.borg()
    known = monitoring.index_file(ctx).load()
    found = []
    for repo in ctx.config.select_repositories(label):
        try:
            found.append(read_repository(borg, repo, known))
        except UserError as exc:
            warnings.add(f"repository {repo.name} could not be read: {exc}")
    with monitoring.index_file(ctx).update() as index:
        for repository in found:
            apply(index, repository)
    for repository in found:
        runs_read = sum(1 for _, manifest in repository.read if manifest is not None)
        click.echo(f"repository {repository.repository}: {runs_read} new run(s) read", err=True)


def read_repository(borg: Borg, repo: Repository, known: Index) -> Found:
    """One listing of the repository, and the manifests of the archives new to `known`."""
    listing = runs.find(borg, repo)
    archives = {name for run in listing for name in run.archives}
    seen = known.archives(repo.name)
    new = [r.name for r in listing if r.state != runs.INCOMPLETE and r.name not in seen]
    manifests = runs.read_manifests(borg, repo, new) if new else []
    return Found(repo.name, archives, list(zip(new, manifests, strict=True)))


def apply(index: Index, found: Found) -> None:
    """Put what a repository holds into the index."""
    index.forget(found.repository, index.archives(found.repository) - found.archives)
    for archive, manifest in found.read:
        if manifest is None:  # not a run: remember not to read it again
            index.foreign.setdefault(found.repository, []).append(archive)
            continue
        run = Run.of(manifest, None)
        run.repositories[found.repository] = Stored(archive)
        index.add(run)
