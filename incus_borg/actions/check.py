"""`incus-borg check`: borg check, and a restore test of the newest run.

The restore test imports every instance of the newest run into a scratch project, one per
archived project so that same-named instances of two projects do not meet (never started, so
it has no network; see restore/sandbox.py), then compares each file of its root filesystem with the archive's own
record of it (`borg list` with {sha256}, mode and owner): nothing extra is read at backup
time. Each instance is deleted once compared, and the scratch projects afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import click

from .. import layout, monitoring
from ..borg import Borg, check_argv, list_files_argv
from ..config import Config, Repository
from ..context import Context
from ..errors import UserError
from ..incus import Incus
from ..manifest import Item
from ..restore.compare import differing, under
from ..restore.journal import RestoreJournal
from ..restore.rollback import refuse_pending_server
from ..restore.sandbox import ScratchProjects
from ..restore.source import BorgSource
from . import drill as drill_action

MAX_REPORTED = 5  # mismatching files named per instance


@dataclass
class CheckOptions:
    """What `check` was asked for."""

    label: str | None = None
    verify_data: bool = False
    restore_test: bool = False
    drill: drill_action.DrillOptions | None = None  # `--drill`: what it restores, and where


def run(ctx: Context, options: CheckOptions) -> int:
    """Check every selected repository; any problem is an error naming what is wrong."""
    return monitoring.watched(ctx, "check", partial(_run, ctx, options))


def _run(ctx: Context, options: CheckOptions) -> int:
    config, borg = ctx.config, ctx.borg()
    if options.restore_test or options.drill:
        refuse_pending_server(RestoreJournal.of(config), ctx.path)
    problems: list[str] = []
    for repo in config.select_repositories(options.label):
        try:
            result = borg.run(check_argv(repo, options.verify_data), repo)
            if result.returncode == 0:
                click.echo(f"repository {repo.name}: borg check passed")
            else:  # check reports damage as warnings: for a check, damage is the error
                first = (result.problems or ["no details"])[0].splitlines()[0]
                problems.append(f"borg check found damage in repository {repo.name}: {first}")
        except UserError as exc:
            problems.append(str(exc))
        if options.restore_test:
            problems += test_restore(config, borg, repo)
        if options.drill:
            problems += drill_action.run(config, borg, repo, options.drill)
    if problems:
        raise UserError("; ".join(problems))
    return 0


def test_restore(config: Config, borg: Borg, repo: Repository) -> list[str]:
    """Import the newest run's instances into scratch projects and compare every file."""
    incus = Incus(config.incus.dir)
    source = BorgSource(borg, repo, "latest")
    scratch = ScratchProjects(incus, source)
    problems: list[str] = []
    try:
        for item in source.manifest.instances:
            if item.failed:  # left out of the run: nothing of it to test
                continue
            project = scratch.for_item(item)
            problems += _check_instance(incus, borg, repo, source, item, project)
    finally:
        scratch.remove()
    if not problems:
        count = len([i for i in source.manifest.instances if not i.failed])
        click.echo(
            f"repository {repo.name}: {source.archive} restores: {count} instance(s) identical"
        )
    return problems


def _check_instance(
    incus: Incus, borg: Borg, repo: Repository, source: BorgSource, item: Item, project: str
) -> list[str]:
    try:
        with source.tar(item) as stream:
            incus.import_instance(stream, item.name, item.pool, project)
    except UserError as exc:
        return [f"restore test: instance {item.ref} does not restore: {exc}"]
    rootfs = f"{item.path}/backup/container/rootfs"
    archive = item.archive or source.archive
    if item.exported:
        listing = source.listing(item)
    else:
        listing = borg.run(list_files_argv(repo, archive, rootfs), repo).stdout
    on_disk = layout.instance_data(Path(incus.dir), item.pool, project, item.name) / "rootfs"
    _, differ = differing(listing, under(rootfs, on_disk))
    wrong = [path.removeprefix(rootfs).lstrip("/") for path in differ]
    incus.delete_instance(project, item.name)  # the disk it takes, back before the next one
    if wrong:
        shown = ", ".join(wrong[:MAX_REPORTED]) + (" ..." if len(wrong) > MAX_REPORTED else "")
        return [
            f"restore test: instance {item.ref}: {len(wrong)} file(s) differ from the archive: {shown}"
        ]
    click.echo(f"restore test: instance {item.ref}: every file identical")
    return []
