"""`incus-borg hook pre|post`: the backup split in two around another program's run."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import click

from .. import layout, monitoring, preflight
from ..backup import groups, keeper, policy
from ..backup.capture import Capture
from ..backup.gate import Gate
from ..backup.keeper import GATED_MODES
from ..backup.plan import Plan
from ..backup.session import Session
from ..borg import checked_version, find_borg
from ..config import parse_duration
from ..context import Context
from ..errors import UserError, Warnings
from ..host import processes, signals, testpoints
from ..manifest import Group, Item


@dataclass
class PreOptions:
    """What `hook pre` was asked for."""

    mode: str | None = None
    instances: tuple[str, ...] = ()
    hold: str | None = None  # just-in-time or whole-run (default: the config's hook_hold)


def _session(ctx: Context, mode: str | None, warnings: Warnings) -> Session:
    report = lambda line: click.echo(line, err=True)  # noqa: E731
    return Session(ctx.config, mode or ctx.config.mode, ctx.incus(), warnings, report)


def pre(ctx: Context, options: PreOptions) -> int:
    """Lay out the complete staging tree, each item quiesced just in time by a gate keeper
    left behind (or everything until `hook post`); returns the exit code."""
    return monitoring.watched(ctx, "hook pre", partial(_pre, ctx, options))


def _pre(ctx: Context, options: PreOptions) -> int:
    preflight.check(ctx.config, ctx.path)
    warnings = Warnings()
    session = _session(ctx, options.mode, warnings)
    record = keeper.Record(keeper.record_path(session.stage.root))
    session.quiescer.end_keepers(record.keepers())  # of a `hook pre` whose post never came
    with session.locked("hook pre"):
        selection = list(options.instances) or ctx.config.instances
        the_plan = session.plan(selection, options.mode)
        leave_out_exports(session, the_plan)
        just_in_time = _just_in_time(session, options.hold or ctx.config.hook_hold)
        record.clear()
        capture = Capture(session)
        with session.holding("hook", release=False):
            capture.run_pres(the_plan)  # their post commands run at `hook post`
            database = capture.capture_server(the_plan)
            gated = _lay_out(capture, the_plan, just_in_time)
            manifest = capture.manifest(the_plan, database, _borg_version(), True)
            session.stage.write(layout.MANIFEST, manifest.to_json())
            write_excludes(session, the_plan)
        if gated:
            _leave_keeper(session, capture, gated, record, the_plan.groups)
    session.report(
        f"staging tree ready at {session.stage.root}; run `incus-borg hook post` after the backup"
    )
    return warnings.exit_code


def _just_in_time(session: Session, hold: str) -> bool:
    """Whether a gate keeper quiesces each item while it is read (else: the whole run)."""
    if hold == "whole-run":
        session.report(WHOLE_RUN)
        return False
    try:
        Gate().close()
    except UserError as exc:
        session.warnings.add(f"{exc}; every instance is held until `hook post` instead")
        return False
    return True


WHOLE_RUN = (
    "whole-run hold (hook_hold: whole-run, or --hold whole-run): every instance stays "
    "quiesced from now until `hook post`; restic reads files in its own order, so no gate "
    "keeper can follow it (for borgmatic or Borg, use just-in-time)"
)


def _lay_out(capture: Capture, the_plan: Plan, just_in_time: bool) -> list[Item]:
    """Mount every item at its stable paths: quiesced until `hook post`, or (just in time)
    with its live data, to be quiesced by the keeper while it is read. Returns the items
    the keeper quiesces."""
    gated = []
    together = [] if just_in_time else _hold_groups(capture, the_plan)
    for item in the_plan.items:
        if item in together:
            continue
        if just_in_time and item.mode in GATED_MODES:
            capture.mount_live(item)
            gated.append(item)
            capture.session.report(
                f"{item.kind} {item.ref}: {item.mode}, just in time while Borg reads it"
            )
            continue
        capture.hold(item)
        testpoints.reached("held", item.ref)
        until = "read as it is" if just_in_time else "held until `hook post`"
        capture.session.report(f"{item.kind} {item.ref}: {item.mode}, {until}")
    return gated


def _hold_groups(capture: Capture, the_plan: Plan) -> list[Item]:
    """Quiesce each group's running members (and its volumes) together until `hook post`
    (whole-run hold), and mount them; returns them."""
    together = []
    for group in the_plan.groups:
        members = [i for i in the_plan.items if i.group == group.name and i.mode != "idle"]
        if not members:
            continue
        if group.mode == "snapshot":
            for taken in capture.take_group_snapshots(members, group):
                capture.hold(taken.item, taken)
            capture.session.report(f"{groups.done(group)}; read from their snapshots")
        else:
            capture.hold_group(members, group)
            capture.session.report(
                f"group {group.name}: {', '.join(group.members)}: {group.mode}, held together "
                "until `hook post`"
            )
        together += members
    return together


def _leave_keeper(
    session: Session,
    capture: Capture,
    gated: list[Item],
    record: keeper.Record,
    groups: list[Group],
) -> None:
    """Leave the gate keeper behind; if it cannot start, undo everything."""
    config = session.config
    lifetime = parse_duration(config.keeper_lifetime) or 0.0
    started_by = keeper.starter()
    kept = keeper.Keeper(
        capture, gated, session.stage.root, record, config.max_window, lifetime, started_by,
        groups=groups,
    )  # fmt: skip
    try:
        pid = keeper.leave(kept, (session.journal.lock_fd,))
    except BaseException:
        with signals.shielded():
            session.journal.follow()
            session.finish()
        raise
    session.journal.follow()
    name = " ".join(processes.cmdline(started_by[0])[:2]) or "?"
    session.report(
        f"gate keeper (pid {pid}) quiesces each instance while Borg reads it; it ends at "
        f"`hook post`, after {config.keeper_lifetime} (keeper_lifetime), or once the program "
        f"that ran `hook pre` ({name}, pid {started_by[0]}) is gone"
    )


def post(ctx: Context, failed: bool) -> int:
    """End the gate keeper, release every quiesce and mount, and empty staging; safe to run
    more than once. Reports each instance's windows; a keeper that was killed or ended by
    itself makes the run not consistent (exit 1). The run goes into the local index (not
    after a failure); metrics and notifications follow."""
    return monitoring.watched(ctx, "hook post", partial(_post, ctx, failed), failed=failed)


def _post(ctx: Context, failed: bool) -> int:
    warnings = Warnings()
    session = _session(ctx, None, warnings)
    record = keeper.Record(keeper.record_path(session.stage.root))
    if record.keepers():  # a SIGTERM from anyone else ends it as "by itself"
        record.write("ask")
    session.quiescer.end_keepers(record.keepers())  # it holds the run lock
    ready = None if failed else monitoring.hook_run(session)  # before staging is emptied
    windows = keeper.report(record, session.report, warnings.add)
    if ready is not None:
        for item in ready.instances + ready.volumes:
            if windows.get(item.ref):
                item.window = max(windows[item.ref])
        held = keeper.group_windows(record)
        for group in ready.groups:  # (a whole-run hold's group keeps what `hook pre` took)
            if group.name in held:
                group.at, group.window = held[group.name]
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
