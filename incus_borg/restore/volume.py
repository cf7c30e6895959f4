"""`incus-borg restore volume`: one custom volume (filesystem or block) with its snapshots."""

from __future__ import annotations

from dataclasses import dataclass

from ..context import Context
from ..errors import UserError
from ..incus import Incus
from ..manifest import Item
from . import config
from .source import Source, open_run
from .target import check_snapshots, find_item, holding, missing_project, report, require_pool


@dataclass
class VolumeOptions:
    """What `restore volume` was asked for."""

    archive: str
    ref: str  # POOL/[P/]NAME
    new_name: str | None = None
    pool: str | None = None
    label: str | None = None


def run(ctx: Context, options: VolumeOptions) -> None:
    """Restore the volume the options name."""
    source = open_run(ctx, options.archive, options.label, latest=holding(options.ref, "volume"))
    item = find_item(source, "volume", options.ref)
    restore(ctx.incus(), source, item, options.new_name, options.pool, None)


def restore(
    incus: Incus,
    source: Source,
    item: Item,
    new_name: str | None,
    pool: str | None,
    project: str | None,
) -> None:
    """Import one custom volume from the run, with its snapshots."""
    name = new_name or item.name
    target_pool = pool or item.pool
    target_project = project or item.project
    require_pool(incus, target_pool)
    new_project = missing_project(incus, source, target_project)
    if not new_project and name in incus.custom_volume_names(target_pool, target_project):
        raise UserError(
            f"volume {target_pool}/{target_project}/{name} already exists: restore beside it "
            "with --as NEW, or delete it first"
        )
    config.recreate(incus, {"projects": new_project}, False, report)
    with source.tar(item) as stream:
        incus.import_volume(stream, target_pool, name, target_project)
    snapshots = incus.volume_snapshots(target_pool, target_project, name)
    check_snapshots(f"volume {target_pool}/{target_project}/{name}", snapshots, item.snapshots)
    report(
        f"volume {item.pool}/{item.ref} restored as {target_pool}/{target_project}/{name} "
        f"({item.type}) with {len(snapshots)} snapshot(s) from {source.description}"
    )
