"""Where things are: Incus's on-disk storage layout, and the staging tree (= the archive tree).

The staging tree, relative to `staging_dir`, is exactly what an archive holds:

    manifest.json                        what the run holds (see manifest.py)
    host/subuid, host/subgid             uid/gid shifting ranges
    database/                            Incus's database, copied while the daemon was stopped
    dumps/local.sql, dumps/global.sql    `incus admin sql local|global .dump`
    definitions/<kind>.yaml              every entity's definition, as the API shows it; on a
                                         cluster, networks and pools carry `member_config`
                                         (member -> its member-specific keys), and
                                         cluster.yaml, cluster-members.yaml and
                                         cluster-groups.yaml describe the cluster
    incus/                               the Incus directory (read-only bind mount)
    instances/<project>/<name>/backup/   laid out as `incus import` expects:
        index.yaml, container/ (bind), snapshots/<snap>/ (bind)
    volumes/<pool>/<project>/<name>/backup/
        index.yaml, volume/ or volume.img (bind), volume-snapshots/<snap>[.img] (bind)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import socket
import string
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

MANIFEST = PurePosixPath("manifest.json")
HOST = PurePosixPath("host")
DATABASE = PurePosixPath("database")
DUMPS = PurePosixPath("dumps")
DEFINITIONS = PurePosixPath("definitions")
INCUS = PurePosixPath("incus")
INSTANCES = PurePosixPath("instances")
VOLUMES = PurePosixPath("volumes")
EXPORTS = PurePosixPath("exports")  # in staging only: each repository's FIFOs of exported items
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


@dataclasses.dataclass
class IncusView:
    """The Incus directory without INCUS_EXCLUDES, laid out for a Borg that is given no
    excludes (hook mode): directories to make, parents first, each a copy of its source's
    owner, mode and times; symbolic links to copy; and what to bind-mount into them."""

    made: list[tuple[PurePosixPath, Path]] = dataclasses.field(default_factory=list)
    links: dict[PurePosixPath, str] = dataclasses.field(default_factory=dict)
    bound: dict[PurePosixPath, Path] = dataclasses.field(default_factory=dict)


def incus_view(incus_dir: Path) -> IncusView:
    """What of `incus_dir` a run holds (staging paths below `incus/`). A directory on
    another file system (a pool's own mount) is held empty, as a bind mount of the Incus
    directory shows it, with its parent's owner and mode (the directory under the mount
    cannot be seen)."""
    view = IncusView()

    def walk(relative: PurePosixPath, source: Path) -> None:
        if source != incus_dir and os.path.ismount(source):
            view.made.append((INCUS / relative, source.parent))
            return
        view.made.append((INCUS / relative, source))
        for entry in sorted(source.iterdir()):
            below = relative / entry.name
            if _excluded(below):
                continue
            if entry.is_symlink():
                view.links[INCUS / below] = os.readlink(entry)
            elif entry.is_dir() and _leads_to_excluded(below):
                walk(below, entry)
            else:
                view.bound[INCUS / below] = entry

    walk(PurePosixPath(), incus_dir)
    return view


def _excluded(relative: PurePosixPath) -> bool:
    return any(
        len(pattern.split("/")) == len(relative.parts)
        and all(map(fnmatch.fnmatchcase, relative.parts, pattern.split("/")))
        for pattern in INCUS_EXCLUDES
    )


def _leads_to_excluded(relative: PurePosixPath) -> bool:
    """Whether something below `relative` is excluded (so it cannot be mounted whole)."""
    depth = len(relative.parts)
    return any(
        len(pattern.split("/")) > depth
        and all(map(fnmatch.fnmatchcase, relative.parts, pattern.split("/")[:depth]))
        for pattern in INCUS_EXCLUDES
    )


STAGING_MARKER = ".incus-borg-staging"  # in the staging directory: incus-borg made it
SNAPSHOT_PREFIX = "incus-borg-"  # temporary snapshots a run takes
# The Borg comment on every archive a run makes (`prune` may delete those), followed by the
# run's state; older versions wrote the mark alone (the state is then in the manifest).
RUN_COMMENT = "incus-borg"
COMPLETE, PARTIAL, UNKNOWN = "complete", "partial", "unknown"
# Pools whose volumes are plain files under the Incus directory: read and restored in place.
READABLE_DRIVERS = frozenset({"dir", "btrfs"})
# How an item's data reaches Borg: read in place (bind mounts of its pool's files), or through
# Incus's own backup stream (everything Incus stores elsewhere: zfs, lvm, ceph, VMs, blocks).
IN_PLACE, EXPORT = "in place", "export"
# Drivers whose export Incus reads from a read-only snapshot of its own (filesystem volumes).
EXPORT_SNAPSHOT_DRIVERS = frozenset({"btrfs", "zfs"})
# In the run's second archive (`<run>@export`), each exported item is the tar stream Incus
# gave, as this file below the item's subtree.
EXPORT_STREAM = "backup.tar"
EXPORT_ARCHIVE = "export"

PART_MARK = "@"  # part archives are named <run>@<kind>@...
# In the archived definition of a cluster's network or pool: member -> its member-specific keys.
MEMBER_CONFIG = "member_config"


def instance_archive(run: str, project: str, name: str) -> str:
    """The archive holding one instance of run `run` (when it has its own)."""
    return PART_MARK.join((run, "instance", project, name))


def volume_archive(run: str, pool: str, project: str, name: str) -> str:
    """The archive holding one custom volume of run `run` (when it has its own)."""
    return PART_MARK.join((run, "volume", pool, project, name))


def export_archive(run: str) -> str:
    """The run's second archive, holding the items read through Incus's export stream."""
    return PART_MARK.join((run, EXPORT_ARCHIVE))


def stream_path(item_path: str) -> str:
    """Where an exported item's stream lies in the export archive (below its subtree)."""
    return f"{item_path}/{EXPORT_STREAM}"


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


def excludes_file(staging_dir: Path) -> Path:
    """Where `hook pre` writes the instances' exclude patterns for another program's Borg
    (beside the staging tree, not in it)."""
    return staging_dir.with_name(staging_dir.name + ".excludes")


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


def run_comment(partial: bool, member: str | None = None) -> str:
    """The Borg comment on every archive of a run: incus-borg's mark, the run's state and,
    on a cluster, the member that made it."""
    comment = f"{RUN_COMMENT} run={PARTIAL if partial else COMPLETE}"
    return f"{comment} member={member}" if member else comment


def parse_comment(comment: str) -> str | None:
    """The state a run's comment records: complete, partial, or unknown (an older run's plain
    mark: read its manifest); None for an archive incus-borg did not make."""
    words = comment.split()
    if not words or words[0] != RUN_COMMENT:
        return None
    states = [w.removeprefix("run=") for w in words[1:] if w.startswith("run=")]
    return states[0] if states and states[0] in (COMPLETE, PARTIAL) else UNKNOWN


def comment_member(comment: str) -> str | None:
    """The cluster member a run's comment names; None for a run of a server that was not
    clustered (or of a version that did not record it)."""
    words = comment.split()
    if not words or words[0] != RUN_COMMENT:
        return None
    return next((w.removeprefix("member=") for w in words if w.startswith("member=")), None)


_CHECKPOINT = re.compile(r"\.checkpoint(\.\d+)?$")


def checkpoint_of(archive: str) -> str | None:
    """The archive a Borg checkpoint (`NAME.checkpoint`, `NAME.checkpoint.N`) was saved for;
    None when `archive` is not a checkpoint."""
    match = _CHECKPOINT.search(archive)
    return archive[: match.start()] if match else None


# --- run names (archive_name_format) ---------------------------------------------------------

NAME_PLACEHOLDERS = ("hostname", "fqdn", "now", "utcnow", "member")
TIME_PLACEHOLDERS = ("now", "utcnow")
ISO_SECONDS = "%Y-%m-%dT%H:%M:%S"  # what {now} gives without a format, as in Borg
# strftime directives that C libraries agree on (and %s, %e, %F, %T of glibc).
_DIRECTIVES = set("aAbBcCdDeFgGhHIjmMnpsStTuUVwWxXyYzZ%")
_DIRECTIVE = re.compile(r"%[-_0^#]?(.?)")


class _Time:
    """A time as a format placeholder: {now} alone gives ISO seconds, {now:FMT} strftime."""

    def __init__(self, when: datetime) -> None:
        self.when = when

    def __format__(self, spec: str) -> str:
        return self.when.strftime(spec or ISO_SECONDS)


class _Fqdn:
    """The host's fully qualified name, looked up only when the format uses it."""

    def __format__(self, spec: str) -> str:
        return format(socket.getfqdn(), spec)


def run_name(
    fmt: str, now: datetime, hostname: str | None = None, member: str | None = None
) -> str:
    """A run's name: `archive_name_format` with its placeholders filled for the time `now`.

    {member} is the cluster member's name, or the hostname when not clustered. On a cluster,
    a format without {member} gets `-{member}` appended, so that two members (on one host,
    or named alike) never give one name.
    """
    host = hostname or socket.gethostname()
    if member and "member" not in _fields(fmt):
        fmt += "-{member}"
    return fmt.format(
        hostname=host,
        fqdn=_Fqdn(),
        now=_Time(now),
        utcnow=_Time(now.astimezone(UTC)),
        member=member or host,
    )


def _fields(fmt: str) -> set[str]:
    """The placeholders a (valid) name format uses."""
    return {f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None}


def name_format_problem(fmt: str) -> str | None:
    """What is wrong with an `archive_name_format`, or None: placeholders must be known and
    plain, the time must be in it, and the names it gives must be valid run names."""
    if not fmt.strip():
        return "is empty"
    try:
        fields = [
            (f, spec, conv) for _, f, spec, conv in string.Formatter().parse(fmt) if f is not None
        ]
    except ValueError as exc:
        return f"is not a valid format ({exc}); write a literal brace as {{{{ or }}}}"
    for field in fields:
        problem = _placeholder_problem(*field)
        if problem:
            return problem
    if not any(name in TIME_PLACEHOLDERS for name, _, _ in fields):
        return "has no {now} or {utcnow}: every run needs a name of its own"
    try:
        early, late = (
            run_name(fmt, datetime(*t)) for t in ((2001, 2, 3, 4, 5, 6), (2012, 11, 22, 13, 14, 15))
        )
    except ValueError as exc:
        return f"cannot be formatted ({exc})"
    if early == late:
        return "gives the same name at every time: put the date and time in it with {now:...}"
    return _name_problem(late)


def _placeholder_problem(name: str, spec: str | None, conversion: str | None) -> str | None:
    """What is wrong with one placeholder of a name format, or None."""
    if name not in NAME_PLACEHOLDERS:
        known = ", ".join(f"{{{p}}}" for p in NAME_PLACEHOLDERS)
        return f"has an unknown placeholder {{{name}}} (known: {known})"
    if conversion or "{" in (spec or ""):
        return f"has a placeholder {{{name}}} with a conversion or a nested field"
    unknown = [d for d in _DIRECTIVE.findall(spec or "") if d not in _DIRECTIVES]
    if name in TIME_PLACEHOLDERS and unknown:
        return f"has {{{name}:{spec}}} with an unknown strftime directive %{unknown[0]}"
    return None


def _name_problem(name: str) -> str | None:
    """What makes `name` unusable as a run's archive name, or None."""
    for bad, why in (
        ("/", "'/'"),
        ("::", "'::'"),
        (PART_MARK, f"'{PART_MARK}' (it marks part archives)"),
    ):
        if bad in name:
            return f"gives names containing {why}, such as {name!r}"
    if "{" in name or "}" in name or any(ord(c) < 32 for c in name):
        return f"gives names with braces or control characters, such as {name!r}"
    if checkpoint_of(name) is not None:
        return f"gives names that Borg takes for checkpoints, such as {name!r}"
    return None
