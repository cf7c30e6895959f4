"""`incus-borg restore instance|volume|config|files`: parts of a run back onto a live server."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import click
import yaml

from .. import entities, layout, pools, signals, unpack
from ..entities import owner_project
from ..errors import UserError
from ..incus import Incus, api_path
from ..manifest import Item
from ..pools import Pool
from ..source import Source, definitions

Report = Callable[[str], None]


def report(line: str) -> None:
    """Say what a restore did."""
    click.echo(line)


def find_item(source: Source, kind: str, ref: str) -> Item:
    """The instance ([P/]NAME) or volume (POOL/[P/]NAME) named `ref` in the run."""
    items = source.manifest.instances if kind == "instance" else source.manifest.volumes
    parts = ref.split("/")
    if kind == "instance":
        if len(parts) > 2:
            raise UserError(f"{ref!r}: name an instance as NAME or PROJECT/NAME")
        found = [
            i for i in items if i.name == parts[-1] and (len(parts) == 1 or i.project == parts[0])
        ]
    else:
        if not 2 <= len(parts) <= 3:
            raise UserError(f"{ref!r}: name a volume as POOL/NAME or POOL/PROJECT/NAME")
        found = [
            i
            for i in items
            if i.pool == parts[0]
            and i.name == parts[-1]
            and (len(parts) == 2 or i.project == parts[1])
        ]
    if not found:
        known = ", ".join(i.ref if kind == "instance" else f"{i.pool}/{i.ref}" for i in items)
        raise UserError(f"no {kind} {ref!r} in {source.description} (it holds: {known or 'none'})")
    if len(found) > 1:
        raise UserError(f"{kind} {ref!r} is ambiguous in {source.description}: add the project")
    return found[0]


def require_pool(incus: Incus, pool: str) -> dict[str, Any]:
    """The definition of a pool of this server; refuses one that does not exist."""
    known = {p["name"]: p for p in incus.query("/1.0/storage-pools?recursion=1")}
    if pool not in known:
        raise UserError(
            f"no storage pool {pool!r} on this server (it has: {', '.join(sorted(known))})"
        )
    return dict(known[pool])


def missing_project(incus: Incus, source: Source, project: str) -> list[dict[str, Any]]:
    """The archived definition of the target project when it must be created first (empty
    when it exists); refuses a project that exists neither here nor in the archive."""
    if project in entities.existing(incus, "projects", None):
        return []
    archived = [p for p in definitions(source, "projects") if p["name"] == project]
    if not archived:
        raise UserError(f"no project {project!r} here nor in the archive: create it first")
    return archived


def volume_names(incus: Incus, pool: str, project: str) -> set[str]:
    """Names of the custom volumes of a pool in a project (snapshots left out)."""
    path = api_path(f"/1.0/storage-pools/{quote(pool)}/volumes/custom", project)
    return {u.rsplit("/", 1)[-1].split("?")[0] for u in incus.query(path)}


# --- instance ------------------------------------------------------------------------------


def instance(
    incus: Incus,
    source: Source,
    ref: str,
    new_name: str | None,
    pool: str | None,
    project: str | None,
    start: bool,
    with_volumes: bool,
    stream: bool = False,
) -> None:
    """Import one instance from the run, with its snapshots, under its name or a new one."""
    item = find_item(source, "instance", ref)
    name = new_name or item.name
    target_project = project or item.project
    target_pool = pool or item.pool
    # Every refusal comes before the first change.
    pool_definition = require_pool(incus, target_pool)
    new_project = missing_project(incus, source, target_project)
    if not new_project and name in entities.existing(incus, "instances", target_project):
        raise UserError(
            f"instance {target_project}/{name} already exists: restore beside it with --as NEW, "
            "or delete it first"
        )
    definition = _definition(source, "instances", item)
    volumes = _attached_volumes(definition)
    missing_volumes = volumes if new_project else _missing_volumes(incus, volumes, target_project)
    if missing_volumes and not with_volumes:
        raise UserError(
            f"instance {item.ref} uses custom volumes that do not exist: "
            f"{', '.join(missing_volumes)}; add --with-volumes to restore them too"
        )
    volume_items = [
        find_item(source, "volume", f"{vol_pool}/{item.project}/{vol_name}")
        for vol_pool, vol_name in (ref.split("/", 1) for ref in missing_volumes)
    ]
    entities.recreate(incus, {"projects": new_project}, False, report)
    _ensure_dependencies(incus, source, definition, target_project)
    for vol_item in volume_items:
        volume(incus, source, vol_item, None, None, target_project)
    args = ["import", "-", name, "--storage", target_pool, "--project", target_project]
    if stream or pool_definition["driver"] not in pools.SUPPORTED:
        with source.tar(item) as tarball:
            incus.feed(args, tarball)
    else:
        target = Pool(incus.dir, pool_definition)
        _unpack_into_pool(incus, source, item, args, target, target_project, name)
    restored = incus.query(api_path(f"/1.0/instances/{quote(name)}", target_project, recursion="1"))
    snapshots = [s["name"] for s in restored.get("snapshots") or []]
    check_snapshots(f"instance {target_project}/{name}", snapshots, item.snapshots)
    report(
        f"instance {item.ref} restored as {target_project}/{name} on pool {target_pool} "
        f"with {len(snapshots)} snapshot(s) from {source.description}"
    )
    if (target_project, name) != (item.project, item.name):
        forget_identity(incus, target_project, name, restored)
        report(
            f"instance {target_project}/{name}: gets new MAC addresses and UUID, beside the original"
        )
    if start:
        incus.change_state(target_project, name, "start")
        report(f"instance {target_project}/{name} started")
    else:
        report(f"instance {target_project}/{name} left stopped (use --start to start it)")


def _unpack_into_pool(
    incus: Incus,
    source: Source,
    item: Item,
    import_args: list[str],
    pool: Pool,
    project: str,
    name: str,
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
                incus.feed(import_args, stub)
            the_plan, checked = _extract_into(source, item, entries, pool, project, name)
        except BaseException:
            with signals.shielded():
                _remove_partial(incus, project, name)
            raise
    report(
        f"instance {project}/{name}: {checked} archived items extracted into pool {pool.name} "
        f"by {len(the_plan.jobs)} borg extraction(s) and checked"
    )


def _extract_into(
    source: Source, item: Item, entries: list[unpack.Entry], pool: Pool, project: str, name: str
) -> tuple[unpack.Plan, int]:
    """Extract the instance's data into the volumes of the imported `project/name`; returns
    the plan it followed and how many archived items were checked in place."""
    places = layout.instance_places(pool.incus_dir, pool.name, project, name, item.snapshots)
    trees = [unpack.Tree(f"{item.path}/backup/{member}", dest) for member, dest in places.items()]
    missing = [str(t.dest) for t in trees if not t.dest.is_dir()]
    if missing:
        raise UserError(f"Incus did not make {', '.join(missing)}: restore with --stream instead")
    excludes = [f"{tree.path}/backup.yaml" for tree in trees]  # Incus wrote its own
    the_plan = unpack.plan(trees, entries, os.cpu_count() or 1, excludes)
    with pool.writable_snapshots([t.dest for t in trees[1:]]):
        source.extract_plan(item, the_plan)
    return the_plan, unpack.verify(trees, entries, excludes)


def _remove_partial(incus: Incus, project: str, name: str) -> None:
    """Delete an instance that a failed restore created (if it got that far)."""
    try:
        if name in entities.existing(incus, "instances", project):
            incus.run(["delete", "--force", name, "--project", project])
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
    incus.query(api_path(f"/1.0/instances/{quote(name)}", project), "PUT", body)


def check_snapshots(what: str, found: list[str], expected: list[str]) -> None:
    """Verify that an import brought back exactly the archived snapshots."""
    if sorted(found) != sorted(expected):
        raise UserError(
            f"{what} was imported with snapshots {found}, expected {expected}: check it before use"
        )


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
        if name not in volume_names(incus, pool, project):
            missing.append(ref)
    return missing


def _ensure_dependencies(
    incus: Incus, source: Source, definition: dict[str, Any], project: str
) -> None:
    """Recreate the profiles and managed networks the instance needs, when missing."""
    profile_project = owner_project(incus, "profiles", project)
    network_project = owner_project(incus, "networks", project)
    profiles = set(definition.get("profiles") or [])
    have_profiles = entities.existing(incus, "profiles", profile_project)
    archived_project = _archived_owner(source, "profiles", definition.get("project", "default"))
    wanted_profiles = [
        {**p, "project": profile_project}
        for p in definitions(source, "profiles")
        if p["name"] in profiles - have_profiles and p.get("project", "default") == archived_project
    ]
    devices = list((definition.get("expanded_devices") or {}).values())
    networks = {d["network"] for d in devices if d.get("type") == "nic" and d.get("network")}
    have_networks = entities.existing(incus, "networks", network_project)
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
    entities.recreate(
        incus, {"networks": wanted_networks, "profiles": wanted_profiles}, False, report
    )


def _archived_owner(source: Source, kind: str, project: str) -> str:
    """The project whose `kind` a project used when it was backed up (its own or default's)."""
    for archived in definitions(source, "projects"):
        if archived["name"] == project:
            config = archived.get("config") or {}
            return project if config.get(entities.FEATURE[kind]) == "true" else "default"
    return "default"


# --- volume --------------------------------------------------------------------------------


def volume(
    incus: Incus,
    source: Source,
    item: Item,
    new_name: str | None,
    pool: str | None,
    project: str | None,
) -> None:
    """Import one custom volume (filesystem or block) from the run, with its snapshots."""
    name = new_name or item.name
    target_pool = pool or item.pool
    target_project = project or item.project
    require_pool(incus, target_pool)
    new_project = missing_project(incus, source, target_project)
    if not new_project and name in volume_names(incus, target_pool, target_project):
        raise UserError(
            f"volume {target_pool}/{target_project}/{name} already exists: restore beside it "
            "with --as NEW, or delete it first"
        )
    entities.recreate(incus, {"projects": new_project}, False, report)
    args = [
        "storage",
        "volume",
        "import",
        target_pool,
        "/dev/stdin",
        name,
        "--project",
        target_project,
    ]
    with source.tar(item) as stream:
        incus.feed(args, stream)
    snapshots = incus.volume_snapshots(target_pool, target_project, name)
    check_snapshots(f"volume {target_pool}/{target_project}/{name}", snapshots, item.snapshots)
    report(
        f"volume {item.pool}/{item.ref} restored as {target_pool}/{target_project}/{name} "
        f"({item.type}) with {len(snapshots)} snapshot(s) from {source.description}"
    )


# --- config --------------------------------------------------------------------------------


def config(
    incus: Incus, source: Source, kinds: list[str], names: tuple[str, ...], replace: bool
) -> None:
    """Recreate projects, networks and profiles from the run's definitions."""
    wanted = {
        kind: [d for d in definitions(source, kind) if not names or d["name"] in names]
        for kind in kinds
    }
    if kinds and names:
        found = {d["name"] for defs in wanted.values() for d in defs}
        unknown = sorted(set(names) - found)
        if unknown:
            raise UserError(f"{', '.join(unknown)} not among the archive's {', '.join(kinds)}")
    outcome = entities.recreate(incus, wanted, replace, report)
    for what in outcome.kept:
        report(f"{what}: exists, left alone (use --replace to overwrite it)")
    if not outcome.created and not outcome.replaced:
        report("nothing to recreate")


# --- files ---------------------------------------------------------------------------------


def files(source: Source, ref: str, paths: tuple[str, ...], dest: Path) -> None:
    """Copy files or directories out of an instance's (or volume's) data into `dest`."""
    item = _files_item(source, ref)
    if item.kind == "instance":
        base = f"{item.path}/backup/container/rootfs"
        idmap = _instance_idmap(source, item)
    elif item.type == "block":
        raise UserError(
            f"volume {item.pool}/{item.ref} is a block volume: it holds no files; restore it "
            "with `incus-borg restore volume`"
        )
    else:
        base = f"{item.path}/backup/volume"
        idmap = _volume_idmap(source, item)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [f"{base}/{p.strip('/')}" for p in paths]
    source.extract(item, wanted, len(Path(base).parts), dest)
    absent = [p for p in paths if not os.path.lexists(dest / p.strip("/"))]
    if absent:
        raise UserError(f"{', '.join(absent)}: not in {item.ref} in {source.description}")
    if idmap:
        for path in paths:
            _unshift(dest / path.strip("/"), idmap)
    for path in paths:
        report(f"{item.ref}:{path} -> {dest / path.strip('/')}")


def _files_item(source: Source, ref: str) -> Item:
    """The instance ([P/]NAME) or volume (POOL/[P/]NAME) that `restore files` names.

    P/NAME and POOL/NAME look alike: an instance is tried first, and its error is the one
    reported when neither exists.
    """
    if ref.count("/") >= 2:
        return find_item(source, "volume", ref)
    try:
        return find_item(source, "instance", ref)
    except UserError as not_instance:
        if "/" not in ref:
            raise
        try:
            return find_item(source, "volume", ref)
        except UserError:
            raise not_instance from None


def _instance_idmap(source: Source, item: Item) -> list[dict[str, Any]]:
    backup = yaml.safe_load(source.read(f"{item.path}/backup/container/backup.yaml", item))
    raw = backup["container"]["config"].get("volatile.last_state.idmap") or "[]"
    return list(json.loads(raw))


def _volume_idmap(source: Source, item: Item) -> list[dict[str, Any]]:
    index = yaml.safe_load(source.read(f"{item.path}/backup/index.yaml", item))
    raw = index["config"]["volume"]["config"].get("volatile.idmap.last") or "[]"
    return list(json.loads(raw))


def _unshift(root: Path, idmap: list[dict[str, Any]]) -> None:
    """Turn the on-disk (host) owners of extracted files into the ones seen inside."""

    def inside(host_id: int, is_uid: bool) -> int:
        for entry in idmap:
            if (entry["Isuid"] if is_uid else entry["Isgid"]) and 0 <= host_id - entry[
                "Hostid"
            ] < entry["Maprange"]:
                return int(entry["Nsid"] + host_id - entry["Hostid"])
        return host_id

    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        st = path.lstat()
        os.lchown(path, inside(st.st_uid, True), inside(st.st_gid, False))
