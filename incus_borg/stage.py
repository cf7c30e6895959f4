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

from . import layout, mounts
from .errors import UserError
from .incus import Incus, api_path
from .plan import Plan, Target

ALL = {"recursion": "1", "all-projects": "true"}
DEFINITIONS = {
    "server": ("/1.0", {}),
    "projects": ("/1.0/projects", {"recursion": "1"}),
    "profiles": ("/1.0/profiles", ALL),
    "networks": ("/1.0/networks", ALL),
    "network-acls": ("/1.0/network-acls", ALL),
    "network-zones": ("/1.0/network-zones", ALL),
    "storage-pools": ("/1.0/storage-pools", {"recursion": "1"}),
    "instances": ("/1.0/instances", ALL),
    "images": ("/1.0/images", ALL),
}
# A zero time: Incus crashes importing a volume snapshot whose expiry is null.
NO_EXPIRY = "0001-01-01T00:00:00Z"


class Stage:
    """The staging directory of one run."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def prepare(self) -> None:
        """Create an empty staging directory (0700), refusing one that still has mounts."""
        if self.root.exists():
            if mounts.mounts_below(self.root):
                raise UserError(
                    f"{self.root} still has mounts below it: unmount them or run `incus-borg hook post`"
                )
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, mode=0o700)
        os.chmod(self.root, 0o700)

    def cleanup(self) -> None:
        """Remove the staging directory's content once nothing is mounted in it."""
        if self.root.exists() and not mounts.mounts_below(self.root):
            shutil.rmtree(self.root)

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
        for kind, (path, params) in DEFINITIONS.items():
            data = incus.query(api_path(path, None, **params))
            if kind == "networks":
                data = [n for n in data if n.get("managed")]
            self.write(layout.DEFINITIONS / f"{kind}.yaml", to_yaml(data))
        volumes = []
        for pool in incus.query(api_path("/1.0/storage-pools")):
            name = pool.rsplit("/", 1)[-1]
            volumes += incus.query(
                api_path(f"/1.0/storage-pools/{name}/volumes/custom", None, **ALL)
            )
            for vol in volumes:
                vol.setdefault("pool", name)
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

    def write_instance_index(self, target: Target) -> None:
        """backup/index.yaml for `incus import` (the config comes from backup.yaml)."""
        self.write(
            layout.instance_stage(target.project, target.name) / "backup" / "index.yaml",
            to_yaml(import_index(target, "container")),
        )

    def write_volume_index(self, incus: Incus, target: Target) -> None:
        """backup/index.yaml for `incus storage volume import`, with the volume's config."""
        base = f"/1.0/storage-pools/{target.pool}/volumes/custom/{target.name}"
        volume = incus.query(api_path(base, target.project))
        snapshots = incus.query(api_path(base + "/snapshots", target.project, recursion="1"))
        kept = []
        for snap in snapshots:
            snap["name"] = snap["name"].rsplit("/", 1)[-1]
            snap["expires_at"] = snap.get("expires_at") or NO_EXPIRY
            snap["content_type"] = snap.get("content_type") or target.type
            if snap["name"] in target.snapshots:
                kept.append(snap)
        index = import_index(target, "custom")
        index["config"] = {"volume": volume, "volume_snapshots": kept}
        stage = layout.volume_stage(target.pool, target.project, target.name)
        self.write(stage / "backup" / "index.yaml", to_yaml(index))

    def write_plan_indexes(self, incus: Incus, plan: Plan) -> None:
        """Import indexes for every planned instance and volume."""
        for target in plan.instances:
            self.write_instance_index(target)
        for target in plan.volumes:
            self.write_volume_index(incus, target)


def import_index(target: Target, kind: str) -> dict[str, Any]:
    """The backup/index.yaml fields `incus import` needs for a non-optimized backup."""
    return {
        "name": target.name,
        "backend": target.driver,
        "pool": target.pool,
        "snapshots": target.snapshots,
        "optimized": False,
        "optimized_header": False,
        "type": kind,
    }


def to_yaml(data: Any) -> str:
    """YAML that Incus (Go) reads back: timestamps stay quoted strings, as JSON gives them."""
    return yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False, default_flow_style=False)
