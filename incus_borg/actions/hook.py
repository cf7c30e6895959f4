"""`incus-borg hook pre|post`: the backup split in two around another program's run."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import click

from .. import layout, monitoring, preflight
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
    return monitoring.watched(ctx, "hook pre", partial(_pre, ctx, options))


def _pre(ctx: Context, options: PreOptions) -> int:
    preflight.check(ctx.config, ctx.path)
    warnings = Warnings()
    session = _session(ctx, options.mode, warnings)
    with session.locked("hook pre"):
        the_plan = plan.build(
            session.incus, session.mode, list(options.instances) or ctx.config.instances
        )
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
    """Release every quiesce and mount, and empty staging; safe to run more than once. The
    run goes into the local index (not after a failure); metrics and notifications follow."""
    return monitoring.watched(ctx, "hook post", partial(_post, ctx, failed), failed=failed)


def _post(ctx: Context, failed: bool) -> int:
    warnings = Warnings()
    session = _session(ctx, None, warnings)
    ready = None if failed else monitoring.hook_run(session)  # before staging is emptied
    with session.locked("hook post"):
        pass
    monitoring.record_hook_run(ctx, ready)
    outcome = "after a failed backup" if failed else "after the backup"
    session.report(f"released every quiesce {outcome}; staging emptied")
    return warnings.exit_code


def _borg_version() -> str:
    """The borg version, when borg is installed (hook mode may feed another program)."""
    try:
        return checked_version(find_borg())
    except UserError:
        return ""
