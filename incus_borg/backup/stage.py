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

import yaml

from .. import layout, mounts
from ..errors import UserError
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

    def write_definitions(self, incus: Incus) -> None:
        """Every entity's definition, as YAML, one file per kind."""
        self.write(layout.DEFINITIONS / "server.yaml", to_yaml(incus.server()))
        for kind in DEFINITIONS:
            data = incus.entities(kind)
            if kind == "networks":
                data = [n for n in data if n.get("managed")]
            self.write(layout.DEFINITIONS / f"{kind}.yaml", to_yaml(data))
        volumes = []
        for pool in incus.pools():
            volumes += [{"pool": pool["name"], **v} for v in incus.custom_volumes(pool["name"])]
        self.write(layout.DEFINITIONS / "storage-volumes.yaml", to_yaml(volumes))

    def write_dumps(self, incus: Incus) -> None:
        """`incus admin sql local|global .dump`."""
        for scope in ("local", "global"):
            self.write(layout.DUMPS / f"{scope}.sql", incus.sql_dump(scope))

    def copy_host_files(self, subuid: Path, subgid: Path) -> None:
        """The subuid and subgid files (absent ones are recorded as absent)."""
        for source, name in ((subuid, "subuid"), (subgid, "subgid")):
            if source.exists():
                self.write(layout.HOST / name, source.read_bytes())

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

    def write_volume_index(self, incus: Incus, item: Item) -> None:
        """backup/index.yaml for `incus storage volume import`, with the volume's config."""
        volume = incus.custom_volume(item.pool, item.project, item.name)
        kept = []
        for snap in incus.volume_snapshot_records(item.pool, item.project, item.name):
            snap["name"] = snap["name"].rsplit("/", 1)[-1]
            snap["expires_at"] = snap.get("expires_at") or NO_EXPIRY
            snap["content_type"] = snap.get("content_type") or item.type
            if snap["name"] in item.snapshots:
                kept.append(snap)
        index = import_index(item, "custom")
        index["config"] = {"volume": volume, "volume_snapshots": kept}
        self.write(PurePosixPath(item.path) / "backup" / "index.yaml", to_yaml(index))

    def write_plan_indexes(self, incus: Incus, plan: Plan) -> None:
        """Import indexes for every instance and volume the run reads."""
        for item in plan.items:
            if item.kind == "instance":
                self.write_instance_index(item)
            else:
                self.write_volume_index(incus, item)


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
    return yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False, default_flow_style=False)
