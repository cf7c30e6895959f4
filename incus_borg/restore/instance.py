"""`incus-borg restore instance`: one instance with its snapshots, under its name or a new one.

Incus imports the instance's definition alone (a stub tarball), which creates the instance,
its snapshots and their records; the data is then extracted straight into those volumes on
`dir` and `btrfs` pools by parallel borg extractions, and checked. Other pools, and
`--stream`, get the data streamed through `incus import` instead.

On a cluster, `incus import` lands on the member that runs the command (Incus 6.0 takes no
target for it): an instance meant for another member (`--target`) is imported here, checked,
then moved there by Incus (a cluster move of the stopped instance) before it takes its name.

The instance is made under a temporary name (`NAME-restoring-XXXXXXXX`), recorded in the
restore journal before the import, and takes its name only once checked. A failure or an
interrupt deletes it again; one that a killed restore left is deleted by the next restore of
that name (and named by any other).
"""

from __future__ import annotations

import io
import os
import secrets
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import click

from .. import layout, profile
from ..context import Context
from ..errors import UserError, Warnings
from ..host import signals, testpoints
from ..incus import Incus
from ..manifest import Item
from . import config, unpack, volume
from .config import owner_project
from .journal import Entry, RestoreJournal, alive, instance_key, when
from .poolmap import map_device_pools
from .pools import Pool
from .rollback import refuse_pending_server
from .source import Source, definitions, open_run
from .target import (
    check_snapshots,
    find_item,
    holding,
    missing_project,
    report,
    require_member,
    require_pool,
)

TEMPORARY = "-restoring-"  # between the name and the token of a restore's temporary name
SETTLE_TIMEOUT = 300  # seconds to wait for an import that goes on after its client died


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
    pool_map: dict[str, str] = field(default_factory=dict)  # archived pool -> pool here
    target: str | None = None  # the cluster member to restore onto (default: this one)


@dataclass
class Target:
    """Where the instance goes, and what must be made first."""

    name: str
    project: str
    pool: dict[str, Any]  # the pool's definition
    new_project: list[dict[str, Any]]  # the project's archived definition, when it is missing
    definition: dict[str, Any]  # the instance's archived definition
    volumes: list[Item]  # custom volumes it uses that must be restored first
    renamed: dict[str, str]  # pools its devices name -> the pools they map to here
    member: str | None = None  # the cluster member it goes to (None: not clustered)
    move_to: str | None = None  # that member, when it is not the one running the command


def run(ctx: Context, archive: str, label: str | None, options: InstanceOptions) -> int:
    """Restore the instance the options name from ARCHIVE; the exit code."""
    journal = RestoreJournal.of(ctx.config)
    refuse_pending_server(journal, ctx.path)
    require_member(ctx.incus(), options.target)  # before the run is read
    project, _, name = options.ref.rpartition("/")
    expect = None if options.stream else (project or "default", name)  # a stream needs no listing
    with profile.phase("open the run"):
        source = open_run(ctx, archive, label, expect, holding(options.ref, "instance"))
    return restore(ctx.incus(), source, options, journal)


def restore(incus: Incus, source: Source, options: InstanceOptions, journal: RestoreJournal) -> int:
    """Import one instance from the run, with its snapshots, under its name or a new one;
    returns the exit code (1 when a killed restore's leftover was deleted)."""
    item = find_item(source, "instance", options.ref)
    with profile.phase("preconditions"):
        target = preconditions(incus, source, item, options)
    warnings = Warnings()
    with signals.interruptible():
        prepare(incus, source, target, options, journal, warnings)
        with profile.phase("instance"):
            made = build(incus, source, item, target, options.stream, journal)
            with discarded_on_failure(incus, journal, [made]):
                take_name(incus, made)
    report_restored(made, source)
    if options.start:
        incus.change_state(target.project, target.name, "start")
        report(f"instance {target.project}/{target.name} started")
    else:
        report(f"instance {target.project}/{target.name} left stopped (use --start to start it)")
    return warnings.exit_code


@dataclass
class Built:
    """An instance made and checked under its temporary name, not yet named."""

    item: Item
    target: Target
    temporary: str
    snapshots: int

    @property
    def key(self) -> str:
        return instance_key(self.target.project, self.target.name)


def prepare(
    incus: Incus,
    source: Source,
    target: Target,
    options: InstanceOptions,
    journal: RestoreJournal,
    warnings: Warnings,
) -> None:
    """What must be there before the instance is made: a killed restore's leftover gone,
    its project, profiles, networks and (with --with-volumes) custom volumes."""
    with profile.phase("leftovers and dependencies"):
        _clear_leftovers(incus, journal, target, warnings)
        config.recreate(incus, {"projects": target.new_project}, False, report)
        _ensure_dependencies(incus, source, target.definition, target.project)
    for vol_item in target.volumes:
        mapped = options.pool_map.get(vol_item.pool)
        volume.restore(incus, source, vol_item, None, mapped, target.project, target.member)


def report_restored(made: Built, source: Source) -> None:
    """Say what was restored, and where."""
    item, target = made.item, made.target
    name, project, pool = target.name, target.project, target.pool["name"]
    where = f" of member {target.member}" if target.member else ""
    report(
        f"instance {item.ref} restored as {project}/{name} on pool {pool}{where} "
        f"with {made.snapshots} snapshot(s) from {source.description}"
    )
    if (project, name) != (item.project, item.name):
        report(f"instance {project}/{name}: gets new MAC addresses and UUID, beside the original")


def build(
    incus: Incus, source: Source, item: Item, target: Target, stream: bool, journal: RestoreJournal
) -> Built:
    """Import the instance under a temporary name (recorded first) and check it; a failure
    or an interrupt deletes it again. `take_name` gives it its name."""
    project, name = target.project, target.name
    temporary = f"{name[:40]}{TEMPORARY}{secrets.token_hex(4)}"
    key = instance_key(project, name)
    entry = {"project": project, "name": name, "temporary": temporary}
    journal.record(key, entry | {"source": source.description})
    made = Built(item, target, temporary, 0)
    with discarded_on_failure(incus, journal, [made], forget=False):
        if stream or item.exported or target.pool["driver"] not in layout.READABLE_DRIVERS:
            with profile.phase("stream into incus import"), source.tar(item) as tarball:
                testpoints.reached("restore-streaming")
                incus.import_instance(tarball, temporary, target.pool["name"], project)
        else:
            pool = Pool(incus.dir, target.pool)
            _unpack_into_pool(incus, source, item, pool, project, temporary, target.renamed)
        restored = incus.instance(project, temporary, recursion="1")
        snapshots = [s["name"] for s in restored.get("snapshots") or []]
        check_snapshots(f"instance {project}/{name}", snapshots, item.snapshots)
        made.snapshots = len(snapshots)
        if (project, name) != (item.project, item.name):
            forget_identity(incus, project, temporary, restored)
        if target.move_to:
            incus.move_instance(project, temporary, target.move_to)
    return made


def take_name(incus: Incus, made: Built) -> None:
    """Give a built instance its name (the restore journal forgets it: it is done)."""
    incus.rename_instance(made.target.project, made.temporary, made.target.name)


@contextmanager
def discarded_on_failure(
    incus: Incus, journal: RestoreJournal, made: list[Built], forget: bool = True
) -> Iterator[None]:
    """Delete the instances `made` still under their temporary names when the block fails
    or is interrupted; when it succeeds (and `forget`), forget them in the restore journal."""
    try:
        yield
    except BaseException:
        with signals.shielded():
            for one in made:
                if _remove_partial(incus, one.target.project, one.temporary):
                    journal.clear(one.key)
        raise
    for one in made if forget else []:
        journal.clear(one.key)


def _clear_leftovers(
    incus: Incus, journal: RestoreJournal, target: Target, warnings: Warnings
) -> None:
    """Instances that killed restores left half-made: the one meant to become the target is
    deleted (it is ours: its temporary name was recorded before it was made), the others
    are named with the command that removes them."""
    mine = instance_key(target.project, target.name)
    for key, entry in journal.entries("instance@").items():
        if key == mine:
            _delete_leftover(incus, journal, key, entry, warnings)
        else:
            _name_leftover(incus, journal, key, entry, warnings)


def _delete_leftover(
    incus: Incus, journal: RestoreJournal, key: str, entry: Entry, warnings: Warnings
) -> None:
    """Delete the temporary instance of a killed restore of the same target, if it exists."""
    project, name, temporary = entry["project"], entry["name"], entry["temporary"]
    if alive(entry):
        raise UserError(
            f"a restore of {project}/{name} (pid {entry['pid']}) is under way: "
            "wait for it to finish"
        )
    if not _settled(incus, project, temporary):
        raise UserError(
            f"Incus still imports {project}/{temporary} for a killed restore: "
            "wait for it to finish, then restore again"
        )
    if exists(incus, project, temporary):
        warnings.add(f"{_half_restored(entry)}: deleting it")
        incus.delete_instance(project, temporary)
    journal.clear(key)


def _name_leftover(
    incus: Incus, journal: RestoreJournal, key: str, entry: Entry, warnings: Warnings
) -> None:
    """Name the temporary instance of another killed restore, or forget a stale entry."""
    project, temporary = entry["project"], entry["temporary"]
    if alive(entry) or incus.instance_busy(project, temporary):
        return
    if not exists(incus, project, temporary):
        journal.clear(key)
        return
    warnings.add(
        f"{_half_restored(entry)}: restore {entry['name']} again, or remove it with "
        f"`incus delete --project {project} {temporary}`"
    )


def _half_restored(entry: Entry) -> str:
    project, temporary = entry["project"], entry["temporary"]
    return (
        f"instance {project}/{temporary} was half-restored as {project}/{entry['name']} by a "
        f"restore that was killed (begun {when(entry['recorded'])})"
    )


def _settled(incus: Incus, project: str, name: str) -> bool:
    """Wait (bounded) until Incus no longer works on `project/name`, such as an import whose
    client was killed; whether it stopped."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while incus.instance_busy(project, name):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def exists(incus: Incus, project: str, name: str) -> bool:
    """Whether instance `project/name` exists (False when the project does not)."""
    if project not in incus.entity_names("projects", None):
        return False
    return name in incus.entity_names("instances", project)


def preconditions(
    incus: Incus, source: Source, item: Item, options: InstanceOptions, replacing: bool = False
) -> Target:
    """Every refusal, before the first change (an instance of the name may exist when it is
    `replacing`)."""
    name = options.new_name or item.name
    project = options.project or item.project
    member = require_member(incus, options.target)
    pool = require_pool(incus, options.pool or item.pool)
    new_project = missing_project(incus, source, project)
    if not replacing and not new_project and name in incus.entity_names("instances", project):
        raise UserError(
            f"instance {project}/{name} already exists: restore beside it with --as NEW, "
            "or delete it first"
        )
    definition = _definition(source, "instances", item)
    volumes = _attached_volumes(definition)
    renamed = _renamed_pools(definition, options, pool["driver"], item)
    mapped = [f"{options.pool_map.get(p, p)}/{n}" for p, n in (v.split("/", 1) for v in volumes)]
    missing = volumes if new_project else _missing_volumes(incus, volumes, mapped, project, member)
    if missing and not options.with_volumes:
        raise UserError(
            f"instance {item.ref} uses custom volumes that do not exist: "
            f"{', '.join(missing)}; add --with-volumes to restore them too"
        )
    volume_items = [
        find_item(source, "volume", f"{vol_pool}/{item.project}/{vol_name}")
        for vol_pool, vol_name in (ref.split("/", 1) for ref in missing)
    ]
    move_to = member if member is not None and member != incus.member() else None
    return Target(
        name, project, pool, new_project, definition, volume_items, renamed, member, move_to
    )


def _unpack_into_pool(
    incus: Incus,
    source: Source,
    item: Item,
    pool: Pool,
    project: str,
    name: str,
    renamed: dict[str, str],
) -> None:
    """Have Incus import the instance without its data, then extract the data straight into
    the volumes it made (in parallel), and check every archived item is in place.

    The import alone builds the instance, its snapshots and their database records from the
    archived backup.yaml (its devices' pools renamed as `renamed` says); the data then never
    passes through a temporary file.
    """
    index, config = layout.instance_import_files(item.path)
    with profile.phase("inspect"):
        files, entries = source.inspect(item, [index, config])
    if not files[index] or not files[config]:
        raise UserError(f"{item.ref} in {source.description} lacks its index.yaml or backup.yaml")
    with tempfile.TemporaryFile() as stub:
        backup_yaml = map_device_pools(files[config], renamed)
        _write_stub(stub, files[index], backup_yaml, item.snapshots)
        stub.seek(0)
        incus.import_instance(stub, name, pool.name, project)
    extractions, checked = _extract_into(source, item, entries, pool, project, name)
    report(
        f"instance {item.ref}: {checked} archived items extracted into pool {pool.name} "
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
    with profile.phase("extract"), pool.writable_snapshots([t.dest for t in trees[1:]]):
        source.extract_all(item, extractions)
    with profile.phase("verify"):
        return extractions, unpack.verify(trees, entries, excludes)


def _remove_partial(incus: Incus, project: str, name: str) -> bool:
    """Delete an instance that a failed restore created (if it got that far); whether none
    is left."""
    try:
        if not _settled(incus, project, name):
            raise UserError(f"Incus still works on it after {SETTLE_TIMEOUT} s")
        if exists(incus, project, name):
            incus.delete_instance(project, name)
    except UserError as left:
        click.echo(f"incus-borg: remove the partial {project}/{name} by hand: {left}", err=True)
        return False
    return True


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


def _missing_volumes(
    incus: Incus, volumes: list[str], here: list[str], project: str, member: str | None
) -> list[str]:
    """The volumes (archived pool/name) whose pool/name on this server (`here`, in the same
    order) does not exist in `project` (on cluster member `member`, when given)."""
    missing = []
    for ref, mapped in zip(volumes, here, strict=True):
        pool, name = mapped.split("/", 1)
        if name not in incus.custom_volume_names(pool, project, member):
            missing.append(ref)
    return missing


def _renamed_pools(
    definition: dict[str, Any], options: InstanceOptions, driver: str, item: Item
) -> dict[str, str]:
    """The pools --pool-map renames (old -> new), for the devices of the definition Incus
    imports; refused where only the streamed import can be used (with --stream, onto other
    drivers, and for an item read through Incus's export), which takes the archived devices
    as they are."""
    renamed = {old: new for old, new in options.pool_map.items() if old != new}
    disks = [d for d in (definition.get("devices") or {}).values() if d.get("type") == "disk"]
    # Incus moves the root disk to the pool it imports onto by itself; not the others.
    others = sorted(
        {d["pool"] for d in disks if d.get("pool") and d.get("path") != "/"} & renamed.keys()
    )
    streamed = options.stream or item.exported or driver not in layout.READABLE_DRIVERS
    if others and streamed:
        how = (
            "its run holds Incus's export of it, which Incus imports with its devices as they were"
            if item.exported
            else "restore it onto a dir or btrfs pool, without --stream"
        )
        raise UserError(
            f"instance {item.ref} has volumes on pools {', '.join(others)}, which are mapped "
            f"to other pools: {how}"
        )
    return renamed


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
