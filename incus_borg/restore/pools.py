"""Putting volumes back into `dir` and `btrfs` (loop file) pools while the daemon is down."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..host import mounts

# A pool's top directories, with the modes Incus gives them.
VOLUME_DIRS = {
    "containers": 0o711,
    "containers-snapshots": 0o711,
    "custom": 0o700,
    "custom-snapshots": 0o700,
    "images": 0o700,
    "virtual-machines": 0o700,
    "virtual-machines-snapshots": 0o700,
}
VOLUME_MODE = 0o711  # what Incus gives a volume's directory


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise UserError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}")


def _set_read_only(subvolume: Path, read_only: bool) -> None:
    _run(["btrfs", "property", "set", "-ts", str(subvolume), "ro", str(read_only).lower()])


class Pool:
    """One storage pool of the restored server, as its definition describes it."""

    def __init__(self, incus_dir: Path, definition: dict[str, Any]) -> None:
        self.name: str = definition["name"]
        self.driver: str = definition["driver"]
        self.config: dict[str, str] = definition.get("config") or {}
        self.root = incus_dir / "storage-pools" / self.name
        self.incus_dir = incus_dir

    @property
    def loop_file(self) -> Path | None:
        """The btrfs image file under the Incus directory, for a loop-backed pool."""
        source = self.config.get("source", "")
        if self.driver == "btrfs" and source.endswith(".img") and "/disks/" in source:
            return self.incus_dir / "disks" / Path(source).name
        return None

    def prepare(self) -> None:
        """Make the pool ready to receive volumes (create and mount a loop file for btrfs)."""
        if self.driver == "btrfs":
            image = self.loop_file
            if image is None:
                raise UserError(
                    f"pool {self.name}: btrfs on a device is not restored in place; restore its "
                    "instances with `incus-borg restore instance` once the server is up"
                )
            image.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
            size = self.config.get("size", "5GiB")
            _run(["truncate", "-s", size, str(image)])
            _run(["mkfs.btrfs", "-q", "-f", str(image)])
            self.root.mkdir(parents=True, exist_ok=True)
            _run(
                [
                    "mount",
                    "-o",
                    "loop,discard=async,user_subvol_rm_allowed",
                    str(image),
                    str(self.root),
                ]
            )
        for name, mode in VOLUME_DIRS.items():
            path = self.root / name
            if not path.is_dir():
                path.mkdir(parents=True, mode=mode)
                os.chmod(path, mode)

    def volume_dir(self, path: Path) -> Path:
        """Create the directory (a subvolume on btrfs) that one volume or snapshot fills.

        It gets Incus's mode for a volume's directory (0711); a filesystem volume's then
        takes its archived root's mode and owner (`lift`).
        """
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.driver == "btrfs":
            _run(["btrfs", "subvolume", "create", str(path)])
        else:
            path.mkdir(mode=0o700)
        os.chmod(path, VOLUME_MODE)
        return path

    def seal_snapshot(self, path: Path) -> None:
        """Snapshots on btrfs are read-only subvolumes."""
        if self.driver == "btrfs":
            _set_read_only(path, True)

    @contextmanager
    def writable_snapshots(self, paths: list[Path]) -> Iterator[None]:
        """Let existing snapshots (read-only subvolumes on btrfs) be written for the duration."""
        opened: list[Path] = []
        try:
            if self.driver == "btrfs":
                for path in paths:
                    _set_read_only(path, False)
                    opened.append(path)
            yield
        finally:
            for path in opened:
                self.seal_snapshot(path)

    def release(self) -> None:
        """Unmount a loop pool, so that Incus mounts it itself when it starts."""
        if self.driver == "btrfs":
            mounts.unmount(self.root)


def lift(directory: Path, child: str) -> None:
    """Move `directory/child`'s content up into `directory`, keeping child's owner and mode."""
    inner = directory / child
    st = inner.lstat()
    for entry in inner.iterdir():
        os.rename(entry, directory / entry.name)
    os.chown(directory, st.st_uid, st.st_gid)
    os.chmod(directory, st.st_mode & 0o7777)
    inner.rmdir()
