"""`incus-borg report --html FILE`: one self-contained page (no external scripts, fonts or
styles, so it can be mailed or served as a file) with the status table, a timeline of runs
per instance, the repositories' growth, and the quiesce windows and daemon downtime per run;
from the live server and the local index, like `status`."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import click

from .. import monitoring
from ..context import Context
from ..errors import UserError
from ..monitoring import coverage
from ..monitoring.page.render import Page, render
from . import status


@dataclass
class ReportOptions:
    """What `report` was asked for."""

    path: Path
    label: str | None = None
    days: int = 30


def run(ctx: Context, options: ReportOptions) -> None:
    """Write the page."""
    if options.days < 1:
        raise UserError(f"--days must be at least 1, got {options.days}")
    found = status.assess(ctx, options.label)
    index = monitoring.index_file(ctx).load()
    held = [r for r in index.ordered() if any(r.held_in(repo) for repo in found.ages)]
    page = Page(
        socket.gethostname(), found.now, options.days, found.ages, found.items, found.gone, held
    )
    write(options.path, render(page))
    counted = coverage.counts(found.items)
    summary = ", ".join(f"{n} {state}" for state, n in counted.items() if n) or "nothing"
    click.echo(f"report written to {options.path}: {summary}")


def write(path: Path, text: str) -> None:
    """Replace `path` with `text`, whole or not at all."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise UserError(f"cannot write the report {path}: {exc.strerror}") from None
