"""The manifest: what one run's archives hold. It is the contract between backup and restore."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

# 1: one archive per instance and volume (Item.archive) and the run's archive with the rest.
# 2: the run is one archive holding everything (Item.archive is None).
# 3: as 2, but the items read through Incus's export (Item.reader) are in `<run>@export`.
FORMAT_VERSION = 3


@dataclass
class Item:
    """One instance or custom volume: planned, read, recorded and restored as this record."""

    kind: str  # "instance" or "volume"
    project: str
    name: str
    pool: str
    driver: str
    type: str  # "container" for instances; "filesystem" or "block" for volumes
    snapshots: list[str]
    state: str  # Running, Stopped or Frozen at backup time ("" for volumes)
    mode: str  # how it was quiesced: snapshot, freeze, stop, none, or idle (nothing to do)
    path: str  # its subtree in the archive
    archive: str | None = None  # the archive holding it; None: the manifest's own archive
    window: float | None = None  # seconds it was quiesced; None in hook mode
    bytes_read: int | None = None
    changed_files: int | None = None  # files that missed Borg's files cache
    users: list[str] = field(default_factory=list)  # running instances (P/NAME) using a volume
    failed: str | None = None  # why it was left out of the run (its data is not in it)
    # Its policy (`user.incus-borg.*`, see backup/policy.py) and what its commands did.
    mode_source: str = ""  # configuration, instance, profile NAME, volume or command line
    excludes: list[str] = field(default_factory=list)  # Borg patterns, relative to its root
    pre: str | None = None
    post: str | None = None
    timeout: int | None = None  # seconds each of pre and post may take
    pre_exit: int | None = None  # None: not run, timed out, or could not be run
    pre_duration: float | None = None
    post_exit: int | None = None
    post_duration: float | None = None
    reader: str = "in place"  # how its data was read: "in place", or "export" (Incus's stream)
    group: str | None = None  # its consistency group (Group.name), if it is in one

    @property
    def exported(self) -> bool:
        """Whether its data is Incus's backup stream (one tar file), not a tree of files."""
        return self.reader == "export"

    @property
    def ref(self) -> str:
        """project/name, as the admin writes it."""
        return f"{self.project}/{self.name}"


@dataclass
class Group:
    """A consistency group: instances captured at one moment (see backup/groups.py)."""

    name: str  # NAME (from the configuration) or PROJECT/NAME (from user.incus-borg.group)
    members: list[str]  # its instances the run read (P/NAME), in the order they are read
    mode: str  # the members' mode: snapshot, freeze, stop, or idle (none was running)
    source: str = ""  # where it was declared: "configuration", or the key's
    at: str | None = None  # when its moment began (ISO 8601, milliseconds); None in hook mode
    # Seconds its members were held together: for snapshot, from the first freeze to the
    # last thaw around the snapshots; for freeze and stop, the whole group's read.
    window: float | None = None
    volumes: list[str] = field(default_factory=list)  # custom volumes (POOL/P/NAME) held with it
    left_out: list[str] = field(default_factory=list)  # members the run could not read (P/NAME)


@dataclass
class Manifest:
    """Everything one run recorded."""

    hostname: str
    run: str
    created: str
    incus_version: str
    borg_version: str
    mode: str
    hook_mode: bool
    database: str  # "exact" (copied with the daemon stopped) or "dumps-only"
    daemon_downtime: float | None
    instances: list[Item] = field(default_factory=list)
    volumes: list[Item] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # Not the whole server: instances were named (--instance, `instances:`) or left out.
    partial: bool = False
    format: int = FORMAT_VERSION
    # The incus-borg that wrote the run ("" in runs of 0.1.0 and older, which did not record it).
    incus_borg_version: str = ""
    member: str | None = None  # the cluster member that made the run; None: not clustered
    database_note: str = ""  # why the database is `dumps-only`, when it is
    groups: list[Group] = field(default_factory=list)  # its consistency groups

    def to_json(self) -> str:
        """Serialise as indented JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Read a manifest written by this or an older format version."""
        try:
            data: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"the archive's manifest is not valid JSON: {exc}") from None
        if data.get("format", 0) > FORMAT_VERSION:
            raise UserError(
                f"the manifest has format {data['format']}, newer than this incus-borg "
                f"understands ({FORMAT_VERSION}): upgrade incus-borg"
            )
        known = {f.name for f in dataclasses.fields(Item)}
        for kind in ("instances", "volumes"):
            data[kind] = [Item(**{k: v for k, v in i.items() if k in known}) for i in data[kind]]
        group_fields = {f.name for f in dataclasses.fields(Group)}
        data["groups"] = [
            Group(**{k: v for k, v in g.items() if k in group_fields})
            for g in data.get("groups", [])
        ]
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})
