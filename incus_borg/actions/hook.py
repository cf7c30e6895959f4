"""`incus-borg hook pre|post`: the backup split in two around another program's run."""

from __future__ import annotations

from dataclasses import dataclass

import click

from .. import layout, preflight
from ..backup import plan
from ..backup.capture import Capture
from ..backup.session import Session
from ..borg import checked_version, find_borg
from ..context import Context
from ..errors import UserError, Warnings


@dataclass
class PreOptions:
    """What `hook pre` was asked for."""

    mode: str | None = None
    instances: tuple[str, ...] = ()


def _session(ctx: Context, mode: str | None, warnings: Warnings) -> Session:
    report = lambda line: click.echo(line, err=True)  # noqa: E731
    return Session(ctx.config, mode or ctx.config.mode, ctx.incus(), warnings, report)


def pre(ctx: Context, options: PreOptions) -> int:
    """Quiesce everything and leave the complete staging tree; returns the exit code."""
    preflight.check(ctx.config, ctx.path)
    warnings = Warnings()
    session = _session(ctx, options.mode, warnings)
    with session.locked("hook pre"):
        selection = list(options.instances) or ctx.config.instances
        the_plan = plan.build(session.incus, session.mode, selection, session.member)
        capture = Capture(session)
        with session.holding("hook", release=False):
            database = capture.capture_server(the_plan)
            for item in the_plan.items:
                capture.hold(item)
                session.report(f"{item.kind} {item.ref}: {item.mode}, held until `hook post`")
            manifest = capture.manifest(the_plan, database, _borg_version(), True)
            session.stage.write(layout.MANIFEST, manifest.to_json())
    session.report(
        f"staging tree ready at {session.stage.root}; run `incus-borg hook post` after the backup"
    )
    return warnings.exit_code


def post(ctx: Context, failed: bool) -> int:
    """Release every quiesce and mount, and empty staging; safe to run more than once."""
    warnings = Warnings()
    session = _session(ctx, None, warnings)
    with session.locked("hook post"):
        pass
    outcome = "after a failed backup" if failed else "after the backup"
    session.report(f"released every quiesce {outcome}; staging emptied")
    return warnings.exit_code


def _borg_version() -> str:
    """The borg version, when borg is installed (hook mode may feed another program)."""
    try:
        return checked_version(find_borg())
    except UserError:
        return ""
