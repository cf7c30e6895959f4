"""`incus-borg restore volume`: one custom volume (filesystem or block) with its snapshots,
onto this server or (`--target`) any member of its cluster."""

from __future__ import annotations

from dataclasses import dataclass

from ..context import Context
from ..errors import UserError
from ..incus import Incus
from ..manifest import Item
from . import config
from .source import Source, open_run
from .target import (
    check_snapshots,
    find_item,
    holding,
    missing_project,
    report,
    require_member,
    require_pool,
)


@dataclass
class VolumeOptions:
    """What `restore volume` was asked for."""

    archive: str
    ref: str  # POOL/[P/]NAME
    new_name: str | None = None
    pool: str | None = None
    label: str | None = None
    target: str | None = None  # the cluster member to restore onto (default: this one)


def run(ctx: Context, options: VolumeOptions) -> None:
    """Restore the volume the options name."""
    incus = ctx.incus()
    member = require_member(incus, options.target)
    source = open_run(ctx, options.archive, options.label, latest=holding(options.ref, "volume"))
    item = find_item(source, "volume", options.ref)
    restore(incus, source, item, options.new_name, options.pool, None, member)


def restore(
    incus: Incus,
    source: Source,
    item: Item,
    new_name: str | None,
    pool: str | None,
    project: str | None,
    member: str | None = None,
) -> None:
    """Import one custom volume from the run, with its snapshots (onto cluster member
    `member`, already checked with `require_member`, when given)."""
    name = new_name or item.name
    target_pool = pool or item.pool
    target_project = project or item.project
    require_pool(incus, target_pool)
    new_project = missing_project(incus, source, target_project)
    where = f" on member {member}" if member else ""
    if not new_project and name in incus.custom_volume_names(target_pool, target_project, member):
        raise UserError(
            f"volume {target_pool}/{target_project}/{name} already exists{where}: restore "
            "beside it with --as NEW, or delete it first"
        )
    config.recreate(incus, {"projects": new_project}, False, report)
    with source.tar(item) as stream:
        incus.import_volume(stream, target_pool, name, target_project, member)
    snapshots = incus.volume_snapshots(target_pool, target_project, name, member)
    check_snapshots(f"volume {target_pool}/{target_project}/{name}", snapshots, item.snapshots)
    report(
        f"volume {item.pool}/{item.ref} restored as {target_pool}/{target_project}/{name}"
        f"{where} ({item.type}) with {len(snapshots)} snapshot(s) from {source.description}"
    )
