"""`incus-borg hook pre|post`: the backup split in two around another program's run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import click

from .. import layout, monitoring, preflight
from ..backup import policy
from ..backup.capture import Capture
from ..backup.plan import Plan
from ..backup.session import Session
from ..borg import checked_version, find_borg
from ..context import Context
from ..errors import UserError, Warnings
from ..host import testpoints


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
        selection = list(options.instances) or ctx.config.instances
        the_plan = session.plan(selection, options.mode)
        leave_out_exports(session, the_plan)
        capture = Capture(session)
        with session.holding("hook", release=False):
            capture.run_pres(the_plan)  # their post commands run at `hook post`
            database = capture.capture_server(the_plan)
            for item in the_plan.items:
                capture.hold(item)
                testpoints.reached("held", item.ref)
                session.report(f"{item.kind} {item.ref}: {item.mode}, held until `hook post`")
            manifest = capture.manifest(the_plan, database, _borg_version(), True)
            session.stage.write(layout.MANIFEST, manifest.to_json())
            write_excludes(session, the_plan)
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


def leave_out_exports(session: Session, the_plan: Plan) -> None:
    """Items read through Incus's export stream cannot be laid out for another program's
    Borg (their data is a stream that incus-borg writes into its own Borg). Those whose data
    can be read in place (on a dir or btrfs pool: a block volume, or anything set to
    `export`) are read in place instead, said in a line; the others are left out of the
    hook-mode run, with a warning naming them, and the run is partial."""
    for item in the_plan.items:
        if not item.exported:
            continue
        if item.driver in layout.READABLE_DRIVERS and (item.kind, item.type) != (
            "instance",
            "virtual-machine",
        ):
            item.reader = layout.IN_PLACE
            session.report(
                f"{item.kind} {item.ref}: read in place (hook mode takes no export stream)"
            )
            continue
        item.failed = "read through Incus's export, which only `incus-borg backup` writes"
        session.warnings.add(
            f"{item.kind} {item.ref} ({item.driver}, {item.type}) left out: its data is "
            "read through Incus's export stream, which only `incus-borg backup` writes; "
            "back it up with `incus-borg backup --instance`, or set its "
            "user.incus-borg.mode to skip"
        )


def write_excludes(session: Session, the_plan: Plan) -> None:
    """The instances' excludes as Borg patterns for the other program (borgmatic's
    `exclude_from`), in a file beside the staging tree; empty when there are none."""
    root = str(session.stage.root)
    lines = [p for item in the_plan.items for p in policy.item_excludes(item, root)]
    path = layout.excludes_file(session.stage.root)
    header = "# user.incus-borg.exclude of the instances in staging (incus-borg hook pre)\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(header + "".join(f"{line}\n" for line in lines))
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None


def _borg_version() -> str:
    """The borg version, when borg is installed (hook mode may feed another program)."""
    try:
        return checked_version(find_borg())
    except UserError:
        return ""
