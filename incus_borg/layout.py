"""Where things are: Incus's on-disk storage layout, and the staging tree (= the archive tree).

The staging tree, relative to `staging_dir`, is exactly what an archive holds:

    manifest.json                        what the run holds (see manifest.py)
    host/subuid, host/subgid             uid/gid shifting ranges
    database/                            Incus's database, copied while the daemon was stopped
    dumps/local.sql, dumps/global.sql    `incus admin sql local|global .dump`
    definitions/<kind>.yaml              every entity's definition, as the API shows it
    incus/                               the Incus directory (read-only bind mount)
    instances/<project>/<name>/backup/   laid out as `incus import` expects:
        index.yaml, container/ (bind), snapshots/<snap>/ (bind)
    volumes/<pool>/<project>/<name>/backup/
        index.yaml, volume/ or volume.img (bind), volume-snapshots/<snap>[.img] (bind)
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

MANIFEST = PurePosixPath("manifest.json")
HOST = PurePosixPath("host")
DATABASE = PurePosixPath("database")
DUMPS = PurePosixPath("dumps")
DEFINITIONS = PurePosixPath("definitions")
INCUS = PurePosixPath("incus")
INSTANCES = PurePosixPath("instances")
VOLUMES = PurePosixPath("volumes")
SERVER_PATHS = (MANIFEST, HOST, DATABASE, DUMPS, DEFINITIONS, INCUS)

# Inside the Incus directory: what is transient, or captured elsewhere in the tree.
INCUS_EXCLUDES = (
    "unix.socket",
    "unix.socket.user",
    "logs",
    "backups/*",
    "shmounts",
    "devices",
    "guestapi",
    "database",
    "disks",
    "storage-pools/*/*/*",
)

STAGING_MARKER = ".incus-borg-staging"  # in the staging directory: incus-borg made it
SNAPSHOT_PREFIX = "incus-borg-"  # temporary snapshots a run takes
RUN_COMMENT = (
    "incus-borg"  # the Borg comment on every archive a run makes: `prune` may delete those
)
# Pools whose volumes are plain files under the Incus directory: read and restored in place.
READABLE_DRIVERS = frozenset({"dir", "btrfs"})

PART_MARK = "@"  # part archives are named <run>@<kind>@...


def instance_archive(run: str, project: str, name: str) -> str:
    """The archive holding one instance of run `run` (when it has its own)."""
    return PART_MARK.join((run, "instance", project, name))


def volume_archive(run: str, pool: str, project: str, name: str) -> str:
    """The archive holding one custom volume of run `run` (when it has its own)."""
    return PART_MARK.join((run, "volume", pool, project, name))


def run_of(archive: str) -> str:
    """The run an archive belongs to: itself, or the run a part archive was made for."""
    return archive.split(PART_MARK, 1)[0]


def is_part(archive: str) -> bool:
    """Whether an archive is a part of a run (one instance or volume), not a run's own."""
    return PART_MARK in archive


def item_members(kind: str, block: bool) -> list[str]:
    """What an instance or volume must hold below its `backup/` to be restored: its index and
    its data."""
    if kind == "instance":
        return ["index.yaml", "container"]
    return ["index.yaml", "volume.img" if block else "volume"]


def instance_import_files(stage: str) -> list[str]:
    """What `incus import` needs of an instance besides its data: its index and config."""
    return [f"{stage}/backup/index.yaml", f"{stage}/backup/container/backup.yaml"]


def instance_volume_name(project: str, name: str) -> str:
    """The on-disk name of an instance's volume (project-prefixed outside `default`)."""
    return name if project == "default" else f"{project}_{name}"


def pool_dir(incus_dir: Path, pool: str) -> Path:
    """Where a pool's volumes are mounted or stored."""
    return incus_dir / "storage-pools" / pool


def instance_data(incus_dir: Path, pool: str, project: str, name: str) -> Path:
    """The directory holding a container (backup.yaml, metadata.yaml, templates, rootfs)."""
    return pool_dir(incus_dir, pool) / "containers" / instance_volume_name(project, name)


def instance_snapshot_data(incus_dir: Path, pool: str, project: str, name: str, snap: str) -> Path:
    """The directory holding one snapshot of a container."""
    volume = instance_volume_name(project, name)
    return pool_dir(incus_dir, pool) / "containers-snapshots" / volume / snap


def volume_data(incus_dir: Path, pool: str, project: str, name: str, block: bool) -> Path:
    """A custom volume's directory, or its image file for a block volume."""
    path = pool_dir(incus_dir, pool) / "custom" / f"{project}_{name}"
    return path / "root.img" if block else path


def volume_snapshot_data(
    incus_dir: Path, pool: str, project: str, name: str, snap: str, block: bool
) -> Path:
    """One snapshot of a custom volume: its directory, or its image file."""
    path = pool_dir(incus_dir, pool) / "custom-snapshots" / f"{project}_{name}" / snap
    return path / "root.img" if block else path


def instance_stage(project: str, name: str) -> PurePosixPath:
    """An instance's subtree in staging and in the archive."""
    return INSTANCES / project / name


def volume_stage(pool: str, project: str, name: str) -> PurePosixPath:
    """A custom volume's subtree in staging and in the archive."""
    return VOLUMES / pool / project / name


def instance_places(
    incus_dir: Path, pool: str, project: str, name: str, snapshots: list[str]
) -> dict[str, Path]:
    """An instance's members below its `backup/` (`container`, `snapshots/<snap>`) -> the
    directories holding them in the pool."""
    places = {"container": instance_data(incus_dir, pool, project, name)}
    for snap in snapshots:
        places[f"snapshots/{snap}"] = instance_snapshot_data(incus_dir, pool, project, name, snap)
    return places


def instance_mounts(
    incus_dir: Path, pool: str, project: str, name: str, snapshots: list[str], source: Path
) -> dict[PurePosixPath, Path]:
    """Stable staging path -> on-disk source, for an instance (read from `source`) and its
    snapshots."""
    backup = instance_stage(project, name) / "backup"
    places = instance_places(incus_dir, pool, project, name, snapshots) | {"container": source}
    return {backup / member: path for member, path in places.items()}


def volume_places(
    incus_dir: Path, pool: str, project: str, name: str, snapshots: list[str], block: bool
) -> dict[str, Path]:
    """A custom volume's members below its `backup/` (`volume`, `volume-snapshots/<snap>`,
    with `.img` for block volumes) -> its directory or image file in the pool."""
    suffix = ".img" if block else ""
    places = {"volume" + suffix: volume_data(incus_dir, pool, project, name, block)}
    for snap in snapshots:
        places[f"volume-snapshots/{snap}{suffix}"] = volume_snapshot_data(
            incus_dir, pool, project, name, snap, block
        )
    return places


def volume_mounts(
    incus_dir: Path,
    pool: str,
    project: str,
    name: str,
    snapshots: list[str],
    block: bool,
    source: Path,
) -> dict[PurePosixPath, Path]:
    """Stable staging path -> on-disk source, for a custom volume (read from `source`) and
    its snapshots."""
    backup = volume_stage(pool, project, name) / "backup"
    places = volume_places(incus_dir, pool, project, name, snapshots, block)
    places["volume.img" if block else "volume"] = source
    return {backup / member: path for member, path in places.items()}
