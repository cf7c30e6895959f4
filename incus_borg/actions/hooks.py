"""`incus-borg hook pre|post`: the backup split in two around another program's run."""

from __future__ import annotations

import click

from .. import layout, plan, signals
from ..borg import checked_version, find_borg
from ..capture import Capture, archive_path, item_for
from ..config import Config
from ..errors import UserError, Warnings
from ..incus import Incus


def _capture(config: Config, mode: str | None, warnings: Warnings) -> Capture:
    return Capture(
        config,
        mode or config.mode,
        Incus(config.incus.dir),
        warnings,
        lambda line: click.echo(line, err=True),
    )


def pre(config: Config, mode: str | None, instances: tuple[str, ...]) -> int:
    """Quiesce everything and leave the complete staging tree; returns the exit code."""
    warnings = Warnings()
    capture = _capture(config, mode, warnings)
    with capture.journal.locked():
        capture.recover("hook pre")
        the_plan = plan.build(capture.incus, capture.mode, list(instances) or config.instances)
        capture.journal.begin("hook", capture.run)
        try:
            with signals.interruptible():
                database = capture.capture_server(the_plan)
                items = {}
                for target in the_plan.instances + the_plan.volumes:
                    capture.hold(target)
                    items[archive_path(target)] = item_for(target)
                    capture.report(
                        f"{target.kind} {target.ref}: {target.mode}, held until `hook post`"
                    )
                manifest = capture.manifest(the_plan, database, items, _borg_version(), True)
                capture.stage.write(layout.MANIFEST, manifest.to_json())
        except BaseException:
            with signals.shielded():
                capture.finish()
            raise
    capture.report(
        f"staging tree ready at {capture.stage.root}; run `incus-borg hook post` after the backup"
    )
    return warnings.exit_code


def post(config: Config, failed: bool) -> int:
    """Release every quiesce and mount, and empty staging; safe to run more than once."""
    warnings = Warnings()
    capture = _capture(config, None, warnings)
    with capture.journal.locked(), signals.shielded():
        capture.recover("hook post")
    outcome = "after a failed backup" if failed else "after the backup"
    capture.report(f"released every quiesce {outcome}; staging emptied")
    return warnings.exit_code


def _borg_version() -> str:
    """The borg version, when borg is installed (hook mode may feed another program)."""
    try:
        return checked_version(find_borg())
    except UserError:
        return ""
