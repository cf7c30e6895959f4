"""Read-only bind mounts at stable paths (so that Borg's files cache sees the same paths), and
an exact reading of the mount table.

Mounts are made with the mount(2) system call: a run makes two per item, and a process per
mount would cost more than the item's whole read when nothing changed.
"""

from __future__ import annotations

import ctypes
import os
import re
import stat
from pathlib import Path

from ..errors import UserError

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 2
_OCTAL = re.compile(rb"\\([0-7]{3})")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def unescape(field: bytes) -> str:
    """A path from /proc/self/mountinfo: octal escapes (`\\040` for a space) decoded, bytes that
    are not UTF-8 kept as the file system encoding keeps them."""
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def mountinfo() -> list[list[bytes]]:
    """/proc/self/mountinfo, one list of fields per mount (id, parent id, ..., mount point)."""
    with open("/proc/self/mountinfo", "rb") as f:
        return [line.split() for line in f]


def mount_points() -> list[str]:
    """Every mount point in this mount namespace."""
    return [unescape(row[4]) for row in mountinfo()]


def _resolved(path: Path) -> str:
    return str(path.resolve()) if path.exists() else str(path)


def is_mounted(path: Path) -> bool:
    """Whether something is mounted exactly at `path`."""
    return _resolved(path) in mount_points()


def mounts_below(root: Path) -> list[Path]:
    """Every mount point at or below `root`, deepest first."""
    prefix = _resolved(root)
    found = {Path(p) for p in mount_points() if p == prefix or p.startswith(prefix + "/")}
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _call(what: str, result: int, path: Path) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise UserError(f"cannot {what} {path}: {os.strerror(errno)}")


def bind_readonly(source: Path, target: Path) -> None:
    """Bind-mount `source` (a directory or a file) read-only and private at `target`: no
    mount made at or below `target` later (a snapshot stacked over it) reaches the mount
    `source` lies on, nor the other way round, whatever their propagation."""
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
    elif not target.exists():  # a target made earlier may be on a read-only mount already
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        target.touch(mode=0o600)
    src, dst = os.fsencode(source), os.fsencode(target)
    _call("bind-mount onto", _libc.mount(src, dst, None, MS_BIND, None), target)
    # A bind of a shared mount joins its peer group, and a bind mount ignores MS_RDONLY on
    # its first call: make it private, then remount it read-only.
    for what, flags in (
        ("make private the mount at", MS_PRIVATE),
        ("make read-only the mount at", MS_REMOUNT | MS_BIND | MS_RDONLY),
    ):
        if _libc.mount(None, dst, None, flags, None) != 0:
            errno = ctypes.get_errno()
            _libc.umount2(dst, 0)
            raise UserError(f"cannot {what} {target}: {os.strerror(errno)}")


def unmount(target: Path, lazy: bool = False) -> None:
    """Unmount `target` (every mount stacked there) if something is mounted there; `lazy`
    detaches a mount that is still busy."""
    while is_mounted(target):
        flags = MNT_DETACH if lazy else 0
        _call("unmount", _libc.umount2(os.fsencode(target), flags), target)


def stacked_at(path: Path) -> int:
    """How many mounts are stacked at `path`."""
    return mount_points().count(_resolved(path))


def unmount_top(target: Path, below: int = 1) -> None:
    """Unmount only the mount stacked last at `target`, when more than `below` mounts are
    stacked there (the ones below it stay), detaching it lazily when it is still busy."""
    if stacked_at(target) <= below:
        return
    where = os.fsencode(target)
    if _libc.umount2(where, 0) != 0:
        _call("unmount", _libc.umount2(where, MNT_DETACH), target)


def unmount_or_detach(target: Path) -> None:
    """Unmount `target`; when it is still busy (a borg being stopped still holds a file open
    in it), detach it lazily: it leaves the tree at once and is gone with its last file."""
    try:
        unmount(target)
    except UserError:
        unmount(target, lazy=True)


def share(path: Path) -> None:
    """Bind-mount a directory onto itself as a shared mount: what a process in another mount
    namespace (made with its propagation unchanged) mounts below it then shows here too."""
    where = os.fsencode(path)
    _call("bind-mount", _libc.mount(where, where, None, MS_BIND, None), path)
    _call("share the mount at", _libc.mount(None, where, None, MS_SHARED, None), path)


def remove_tree(path: Path, keep: tuple[str, ...] = ()) -> None:
    """Delete a tree incus-borg made (or its content but `keep`, when `keep` is given): first
    check that nothing is mounted below it, and never descend into another file system."""
    if not os.path.lexists(path):
        return
    below = mounts_below(path)
    if below:
        raise UserError(
            f"not deleting {path}: {below[0]} is mounted below it; unmount it first "
            "(`incus-borg hook post` does, for the staging directory)"
        )
    device = path.lstat().st_dev
    if keep:
        for entry in os.scandir(path):
            if entry.name not in keep:
                _remove(Path(entry.path), device)
    else:
        _remove(path, device)


def _remove(path: Path, device: int) -> None:
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        path.unlink()
        return
    if st.st_dev != device:
        raise UserError(f"not deleting {path}: it is on another file system")
    for entry in os.scandir(path):
        _remove(Path(entry.path), device)
    path.rmdir()
