"""`incus-borg restore instance`: one instance with its snapshots, under its name or a new one.

Incus imports the instance's definition alone (a stub tarball), which creates the instance,
its snapshots and their records; the data is then extracted straight into those volumes on
`dir` and `btrfs` pools by parallel borg extractions, and checked. Other pools, and
`--stream`, get the data streamed through `incus import` instead.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from dataclasses import dataclass
from typing import IO, Any

import click

from .. import layout, signals
from ..context import Context
from ..errors import UserError
from ..incus import Incus
from ..manifest import Item
from . import config, unpack, volume
from .config import owner_project
from .pools import Pool
from .source import Source, definitions, open_run
from .target import check_snapshots, find_item, holding, missing_project, report, require_pool


@dataclass
class InstanceOptions:
    """What `restore instance` was asked for."""

    ref: str  # [P/]NAME in the run
    new_name: str | None = None
    pool: str | None = None
    project: str | None = None
    start: bool = False
    with_volumes: bool = False
    stream: bool = False


@dataclass
class _Target:
    """Where the instance goes, and what must be made first."""

    name: str
    project: str
    pool: dict[str, Any]  # the pool's definition
    new_project: list[dict[str, Any]]  # the project's archived definition, when it is missing
    definition: dict[str, Any]  # the instance's archived definition
    volumes: list[Item]  # custom volumes it uses that must be restored first


def run(ctx: Context, archive: str, label: str | None, options: InstanceOptions) -> None:
    """Restore the instance the options name from ARCHIVE."""
    project, _, name = options.ref.rpartition("/")
    source = open_run(
        ctx, archive, label, (project or "default", name), holding(options.ref, "instance")
    )
    restore(ctx.incus(), source, options)


def restore(incus: Incus, source: Source, options: InstanceOptions) -> None:
    """Import one instance from the run, with its snapshots, under its name or a new one."""
    item = find_item(source, "instance", options.ref)
    target = _preconditions(incus, source, item, options)
    config.recreate(incus, {"projects": target.new_project}, False, report)
    _ensure_dependencies(incus, source, target.definition, target.project)
    for vol_item in target.volumes:
        volume.restore(incus, source, vol_item, None, None, target.project)
    name, project, pool = target.name, target.project, target.pool["name"]
    if options.stream or target.pool["driver"] not in layout.READABLE_DRIVERS:
        with source.tar(item) as tarball:
            incus.import_instance(tarball, name, pool, project)
    else:
        _unpack_into_pool(incus, source, item, Pool(incus.dir, target.pool), project, name)
    restored = incus.instance(project, name, recursion="1")
    snapshots = [s["name"] for s in restored.get("snapshots") or []]
    check_snapshots(f"instance {project}/{name}", snapshots, item.snapshots)
    report(
        f"instance {item.ref} restored as {project}/{name} on pool {pool} "
        f"with {len(snapshots)} snapshot(s) from {source.description}"
    )
    if (project, name) != (item.project, item.name):
        forget_identity(incus, project, name, restored)
        report(f"instance {project}/{name}: gets new MAC addresses and UUID, beside the original")
    if options.start:
        incus.change_state(project, name, "start")
        report(f"instance {project}/{name} started")
    else:
        report(f"instance {project}/{name} left stopped (use --start to start it)")


def _preconditions(incus: Incus, source: Source, item: Item, options: InstanceOptions) -> _Target:
    """Every refusal, before the first change."""
    name = options.new_name or item.name
    project = options.project or item.project
    pool = require_pool(incus, options.pool or item.pool)
    new_project = missing_project(incus, source, project)
    if not new_project and name in incus.entity_names("instances", project):
        raise UserError(
            f"instance {project}/{name} already exists: restore beside it with --as NEW, "
            "or delete it first"
        )
    definition = _definition(source, "instances", item)
    volumes = _attached_volumes(definition)
    missing = volumes if new_project else _missing_volumes(incus, volumes, project)
    if missing and not options.with_volumes:
        raise UserError(
            f"instance {item.ref} uses custom volumes that do not exist: "
            f"{', '.join(missing)}; add --with-volumes to restore them too"
        )
    volume_items = [
        find_item(source, "volume", f"{vol_pool}/{item.project}/{vol_name}")
        for vol_pool, vol_name in (ref.split("/", 1) for ref in missing)
    ]
    return _Target(name, project, pool, new_project, definition, volume_items)


def _unpack_into_pool(
    incus: Incus, source: Source, item: Item, pool: Pool, project: str, name: str
) -> None:
    """Have Incus import the instance without its data, then extract the data straight into
    the volumes it made (in parallel), and check every archived item is in place.

    The import alone builds the instance, its snapshots and their database records from the
    archived backup.yaml; the data then never passes through a temporary file. On any
    failure the new instance is deleted again.
    """
    index, config = layout.instance_import_files(item.path)
    files, entries = source.inspect(item, [index, config])
    if not files[index] or not files[config]:
        raise UserError(f"{item.ref} in {source.description} lacks its index.yaml or backup.yaml")
    with signals.interruptible():
        try:
            with tempfile.TemporaryFile() as stub:
                _write_stub(stub, files[index], files[config], item.snapshots)
                stub.seek(0)
                incus.import_instance(stub, name, pool.name, project)
            extractions, checked = _extract_into(source, item, entries, pool, project, name)
        except BaseException:
            with signals.shielded():
                _remove_partial(incus, project, name)
            raise
    report(
        f"instance {project}/{name}: {checked} archived items extracted into pool {pool.name} "
        f"by {len(extractions.jobs)} borg extraction(s) and checked"
    )


def _extract_into(
    source: Source, item: Item, entries: list[unpack.Entry], pool: Pool, project: str, name: str
) -> tuple[unpack.Extractions, int]:
    """Extract the instance's data into the volumes of the imported `project/name`; returns
    the extractions it ran and how many archived items were checked in place."""
    places = layout.instance_places(pool.incus_dir, pool.name, project, name, item.snapshots)
    trees = [unpack.Tree(f"{item.path}/backup/{member}", dest) for member, dest in places.items()]
    missing = [str(t.dest) for t in trees if not t.dest.is_dir()]
    if missing:
        raise UserError(f"Incus did not make {', '.join(missing)}: restore with --stream instead")
    excludes = [f"{tree.path}/backup.yaml" for tree in trees]  # Incus wrote its own
    extractions = unpack.split(trees, entries, os.cpu_count() or 1, excludes)
    with pool.writable_snapshots([t.dest for t in trees[1:]]):
        source.extract_all(item, extractions)
    return extractions, unpack.verify(trees, entries, excludes)


def _remove_partial(incus: Incus, project: str, name: str) -> None:
    """Delete an instance that a failed restore created (if it got that far)."""
    try:
        if name in incus.entity_names("instances", project):
            incus.delete_instance(project, name)
    except UserError as left:
        click.echo(f"incus-borg: remove the partial {project}/{name} by hand: {left}", err=True)


def _write_stub(out: IO[bytes], index: bytes, config: bytes, snapshots: list[str]) -> None:
    """An `incus import` tarball holding an instance's index and config but no data."""
    with tarfile.open(fileobj=out, mode="w") as tar:
        members: list[tuple[str, bytes | None]] = [
            ("backup", None),
            ("backup/index.yaml", index),
            ("backup/container", None),
            ("backup/container/backup.yaml", config),
            ("backup/snapshots", None),
        ]
        members += [(f"backup/snapshots/{snap}", None) for snap in snapshots]
        for path, data in members:
            info = tarfile.TarInfo(path)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o700
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o600
                tar.addfile(info, io.BytesIO(data))


IDENTITY_KEYS = ("volatile.uuid", "volatile.uuid.generation")
UPDATABLE = ("architecture", "devices", "ephemeral", "profiles", "stateful", "description")


def forget_identity(incus: Incus, project: str, name: str, instance: dict[str, Any]) -> None:
    """Drop a copy's MAC addresses and UUID so that it can run beside its original."""
    config = {
        k: v
        for k, v in instance["config"].items()
        if k not in IDENTITY_KEYS and not (k.startswith("volatile.") and k.endswith(".hwaddr"))
    }
    body = {k: instance[k] for k in UPDATABLE if k in instance} | {"config": config}
    incus.update_instance(project, name, body)


def _definition(source: Source, kind: str, item: Item) -> dict[str, Any]:
    for definition in definitions(source, kind):
        if definition["name"] == item.name and definition.get("project", "default") == item.project:
            return definition
    raise UserError(f"{source.description} holds no definition of {item.ref}")


def _attached_volumes(definition: dict[str, Any]) -> list[str]:
    """pool/name of the custom volumes an instance attaches."""
    devices = definition.get("expanded_devices") or definition.get("devices") or {}
    return sorted(
        f"{d['pool']}/{d['source']}"
        for key, d in devices.items()
        if d.get("type") == "disk" and key != "root" and d.get("pool") and d.get("source")
    )


def _missing_volumes(incus: Incus, volumes: list[str], project: str) -> list[str]:
    """The volumes (pool/name) that do not exist in `project`."""
    missing = []
    for ref in volumes:
        pool, name = ref.split("/", 1)
        if name not in incus.custom_volume_names(pool, project):
            missing.append(ref)
    return missing


def _ensure_dependencies(
    incus: Incus, source: Source, definition: dict[str, Any], project: str
) -> None:
    """Recreate the profiles and managed networks the instance needs, when missing."""
    profile_project = owner_project(incus, "profiles", project)
    network_project = owner_project(incus, "networks", project)
    profiles = set(definition.get("profiles") or [])
    have_profiles = incus.entity_names("profiles", profile_project)
    archived_project = _archived_owner(source, "profiles", definition.get("project", "default"))
    wanted_profiles = [
        {**p, "project": profile_project}
        for p in definitions(source, "profiles")
        if p["name"] in profiles - have_profiles and p.get("project", "default") == archived_project
    ]
    devices = list((definition.get("expanded_devices") or {}).values())
    networks = {d["network"] for d in devices if d.get("type") == "nic" and d.get("network")}
    have_networks = incus.entity_names("networks", network_project)
    wanted_networks = [
        {**n, "project": network_project}
        for n in definitions(source, "networks")
        if n["name"] in networks - have_networks
    ]
    missing = (profiles - have_profiles) - {p["name"] for p in wanted_profiles}
    if missing:
        raise UserError(
            f"profiles {sorted(missing)} are missing here and in the archive: create them first"
        )
    config.recreate(
        incus, {"networks": wanted_networks, "profiles": wanted_profiles}, False, report
    )


def _archived_owner(source: Source, kind: str, project: str) -> str:
    """The project whose `kind` a project used when it was backed up (its own or default's)."""
    for archived in definitions(source, "projects"):
        if archived["name"] == project:
            settings = archived.get("config") or {}
            return project if settings.get(config.FEATURE[kind]) == "true" else "default"
    return "default"
