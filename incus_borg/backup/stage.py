"""The staging tree's metadata: definitions, dumps, host files, database copy, import indexes.

Staging holds metadata only (0700 directories, 0600 files); instance and volume data are
bind-mounted into it by the backup action, never copied.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from .. import layout, yamlio
from ..errors import UserError
from ..host import mounts
from ..incus import Incus
from ..manifest import Item
from .plan import Plan

# The kinds of entity whose definitions a run stores (besides the server and volumes).
DEFINITIONS = (
    "projects",
    "profiles",
    "networks",
    "network-acls",
    "network-zones",
    "storage-pools",
    "instances",
    "images",
)
# Kinds whose config has member-specific keys on a cluster (see layout.MEMBER_CONFIG).
MEMBER_CONFIG_KINDS = ("networks", "storage-pools")
# A zero time: Incus crashes importing a volume snapshot whose expiry is null.
NO_EXPIRY = "0001-01-01T00:00:00Z"


class Stage:
    """The staging directory of one run."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def marker(self) -> Path:
        """The file that says incus-borg made this staging directory."""
        return self.root / layout.STAGING_MARKER

    @property
    def ours(self) -> bool:
        """Whether the staging directory exists and incus-borg made it."""
        return self.marker.is_file()

    def check(self) -> None:
        """Refuse a staging directory that incus-borg did not make (before anything runs):
        one that exists, is not empty and holds no marker is never emptied."""
        if not os.path.lexists(self.root) or self.ours:
            return
        if not self.root.is_dir() or self.root.is_symlink():
            raise UserError(f"staging_dir {self.root} is not a directory: fix staging_dir")
        if any(self.root.iterdir()):
            raise UserError(
                f"staging_dir {self.root} is not empty and incus-borg did not make it (it has no "
                f"{layout.STAGING_MARKER}): point staging_dir at a new or empty directory"
            )

    def prepare(self) -> None:
        """An empty staging directory (0700) holding only its marker."""
        self.check()
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.root, 0o700)
            self.marker.touch(mode=0o600)
        except OSError as exc:
            raise UserError(
                f"cannot write staging_dir {self.root}: {exc.strerror}; fix staging_dir"
            ) from None
        mounts.remove_tree(self.root, keep=(layout.STAGING_MARKER,))

    def cleanup(self) -> None:
        """Empty the staging directory once nothing is mounted in it (it keeps its marker)."""
        if self.ours and not mounts.mounts_below(self.root):
            mounts.remove_tree(self.root, keep=(layout.STAGING_MARKER,))

    def path(self, relative: PurePosixPath) -> Path:
        """The absolute path of a staging-relative path."""
        return self.root / relative

    def write(self, relative: PurePosixPath, content: str | bytes) -> Path:
        """Write a file readable by root only."""
        target = self.path(relative)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
        return target

    # --- metadata --------------------------------------------------------------------------

    def write_definitions(self, incus: Incus, clustered: bool = False) -> None:
        """Every entity's definition, as YAML, one file per kind; on a cluster, also the
        cluster, its members and groups, and each network's and pool's per-member config."""
        self.write(layout.DEFINITIONS / "server.yaml", to_yaml(incus.server()))
        members = self.write_cluster(incus) if clustered else []
        for kind in DEFINITIONS:
            data = incus.entities(kind)
            if kind == "networks":
                data = [n for n in data if n.get("managed")]
            if kind in MEMBER_CONFIG_KINDS and members:
                data = [with_member_config(incus, kind, entity, members) for entity in data]
            self.write(layout.DEFINITIONS / f"{kind}.yaml", to_yaml(data))
        volumes = []
        for pool in incus.pools():
            volumes += [{"pool": pool["name"], **v} for v in incus.custom_volumes(pool["name"])]
        self.write(layout.DEFINITIONS / "storage-volumes.yaml", to_yaml(volumes))

    def write_cluster(self, incus: Incus) -> list[str]:
        """The cluster, its members and its groups; returns the members that are not
        offline (whose per-member config can be asked for)."""
        members = incus.cluster_members()
        for name, content in (
            ("cluster", incus.cluster()),
            ("cluster-members", members),
            ("cluster-groups", incus.cluster_groups()),
        ):
            self.write(layout.DEFINITIONS / f"{name}.yaml", to_yaml(content))
        return [m["server_name"] for m in members if m.get("status") != "Offline"]

    def write_dumps(self, incus: Incus) -> None:
        """`incus admin sql local|global .dump`."""
        for scope in ("local", "global"):
            self.write(layout.DUMPS / f"{scope}.sql", incus.sql_dump(scope))

    def copy_host_files(self, subuid: Path, subgid: Path) -> None:
        """The subuid and subgid files (absent ones are recorded as absent)."""
        for source, name in ((subuid, "subuid"), (subgid, "subgid")):
            if source.exists():
                self.write(layout.HOST / name, source.read_bytes())

    def make_view(self, view: layout.IncusView) -> None:
        """Make the view's directories (each with its source's owner, mode and times) and
        symbolic links; its mounts are the caller's."""
        for relative, source in view.made:
            target = self.path(relative)
            target.mkdir(exist_ok=True, mode=0o700)
            st = source.stat()
            os.chown(target, st.st_uid, st.st_gid)
            os.chmod(target, st.st_mode & 0o7777)
        for relative, link in view.links.items():
            os.symlink(link, self.path(relative))
        for relative, source in reversed(view.made):  # children first: making them sets times
            st = source.stat()
            os.utime(self.path(relative), ns=(st.st_atime_ns, st.st_mtime_ns))

    def copy_database(self, incus_dir: Path) -> None:
        """Copy the Incus database directory (call while the daemon is stopped)."""
        target = self.path(layout.DATABASE)
        shutil.copytree(incus_dir / "database", target, symlinks=True)
        for dirpath, _dirnames, filenames in os.walk(target):
            os.chmod(dirpath, 0o700)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o600)

    def write_instance_index(self, item: Item) -> None:
        """backup/index.yaml for `incus import` (the config comes from backup.yaml)."""
        self.write(
            PurePosixPath(item.path) / "backup" / "index.yaml",
            to_yaml(import_index(item, "container")),
        )

    def write_volume_index(self, incus: Incus, item: Item, member: str | None = None) -> None:
        """backup/index.yaml for `incus storage volume import`, with the volume's config (of
        the volume on cluster member `member`, when given)."""
        ref = (item.pool, item.project, item.name)
        volume = incus.custom_volume(*ref, member)
        kept = []
        for snap in incus.volume_snapshot_records(*ref, member):
            snap["name"] = snap["name"].rsplit("/", 1)[-1]
            snap["expires_at"] = snap.get("expires_at") or NO_EXPIRY
            snap["content_type"] = snap.get("content_type") or item.type
            if snap["name"] in item.snapshots:
                kept.append(snap)
        index = import_index(item, "custom")
        index["config"] = {"volume": volume, "volume_snapshots": kept}
        self.write(PurePosixPath(item.path) / "backup" / "index.yaml", to_yaml(index))

    def write_plan_indexes(self, incus: Incus, plan: Plan, member: str | None = None) -> None:
        """Import indexes for every instance and volume the run reads (`member`: the cluster
        member whose volumes they are)."""
        for item in plan.items:
            if item.exported:  # Incus's backup stream holds its own index
                continue
            if item.kind == "instance":
                self.write_instance_index(item)
            else:
                self.write_volume_index(incus, item, member)


def with_member_config(
    incus: Incus, kind: str, entity: dict[str, Any], members: list[str]
) -> dict[str, Any]:
    """A network's or pool's definition with `member_config`: for each cluster member that
    answers, the keys its config there adds to the cluster-wide config (such as a pool's
    `source` or a macvlan network's `parent`)."""
    common = entity.get("config") or {}
    project = entity.get("project") if kind == "networks" else None
    config = {}
    for member in members:
        try:
            there = incus.entity(kind, project, entity["name"], member).get("config") or {}
        except UserError:  # an offline member: its keys are in the global dump only
            continue
        config[member] = {k: v for k, v in there.items() if k not in common}
    return {**entity, layout.MEMBER_CONFIG: config}


def import_index(item: Item, kind: str) -> dict[str, Any]:
    """The backup/index.yaml fields `incus import` needs for a non-optimized backup."""
    return {
        "name": item.name,
        "backend": item.driver,
        "pool": item.pool,
        "snapshots": item.snapshots,
        "optimized": False,
        "optimized_header": False,
        "type": kind,
    }


def to_yaml(data: Any) -> str:
    """YAML that Incus (Go) reads back: timestamps stay quoted strings, as JSON gives them."""
    return yamlio.dump(json.loads(json.dumps(data)), sort_keys=False, default_flow_style=False)
