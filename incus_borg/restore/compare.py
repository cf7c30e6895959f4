"""Restored files compared with the archive's own record of them (`borg list` with {sha256},
mode and owner: nothing extra is read at backup time).

Borg records a file with several names once, under the first name it met, and each further
name as a hard link (its mode starts with `h`, its `source` is the first name, and it has no
digest of its own). A hard link is compared by the content of the file it links to, and it
must be the same inode as that file on disk.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import layout
from ..manifest import Item

INCUS_WRITES = "backup.yaml"  # in each volume's top directory: Incus writes its own on import
# Where an archived path is restored, and whether its mode and owner count; None: not compared.
Locate = Callable[[str], tuple[Path, bool] | None]


def is_hard_link(entry: dict[str, Any]) -> bool:
    """Whether a listed item is a further name of a file listed before it."""
    return str(entry.get("mode", "")).startswith("h") and bool(entry.get("source"))


def differing(listing: str, locate: Locate) -> tuple[int, list[str]]:
    """How many archived items of `listing` (borg's JSON lines) were compared with where
    `locate` puts them, and the archive paths of those that differ."""
    entries = [json.loads(line) for line in listing.splitlines() if line.strip()]
    by_path = {entry["path"]: entry for entry in entries}
    compared, wrong, differ = 0, [], set()
    for entry in entries:  # a hard link comes after the file it links to
        found = locate(entry["path"])
        if found is None:
            continue
        compared += 1
        # A link whose file differs is not blamed for no longer sharing its inode.
        linked = not is_hard_link(entry) or str(entry["source"]) not in differ
        if not _same(entry, *found, by_path, locate, linked):
            wrong.append(entry["path"])
            differ.add(entry["path"])
    return compared, wrong


def _same(
    entry: dict[str, Any],
    path: Path,
    modes: bool,
    by_path: dict[str, dict[str, Any]],
    locate: Locate,
    linked: bool = True,
) -> bool:
    """Whether a restored item has the archived content (for a hard link: its target's, and,
    with `linked`, the target's inode), and (with `modes`) mode and owner."""
    record, mode = entry, str(entry["mode"])
    if is_hard_link(entry):
        target = by_path.get(str(entry["source"]))
        if target is None:  # the file it links to is not in the listing
            return False
        record, mode = target, "-" + mode[1:]
    try:
        st = path.lstat()
    except OSError:
        return False
    if modes and (stat.filemode(st.st_mode), st.st_uid, st.st_gid) != (
        mode,
        entry["uid"],
        entry["gid"],
    ):
        return False
    if record is not entry and linked and not _one_inode(st, locate(str(record["path"]))):
        return False
    if stat.S_ISREG(st.st_mode):
        with path.open("rb") as f:
            return bool(hashlib.file_digest(f, "sha256").hexdigest() == record["sha256"])
    return True


def _one_inode(st: Any, target: tuple[Path, bool] | None) -> bool:
    """Whether a restored hard link is the same inode as where its target was restored."""
    if target is None:
        return True  # its target is not compared here: its content is all there is to check
    try:
        other = target[0].lstat()
    except OSError:
        return False
    return bool((other.st_ino, other.st_dev) == (st.st_ino, st.st_dev))


def under(root: str, on_disk: Path) -> Locate:
    """Items below the archive path `root` (the root itself left out), restored below
    `on_disk`, mode and owner counting."""
    prefix = root.rstrip("/") + "/"

    def locate(path: str) -> tuple[Path, bool] | None:
        if not path.startswith(prefix):
            return None
        return on_disk / path.removeprefix(prefix), True

    return locate


def places(incus_dir: Path, pool: str, item: Item) -> dict[str, Path]:
    """An instance's or volume's members below its `backup/` -> where they are in a pool."""
    if item.kind == "instance":
        return layout.instance_places(incus_dir, pool, item.project, item.name, item.snapshots)
    block = item.type == "block"
    return layout.volume_places(incus_dir, pool, item.project, item.name, item.snapshots, block)


def in_places(item: Item, where: dict[str, Path]) -> Locate:
    """An item's archived files below its `backup/`, in its members' places (see `places`).
    A block volume's image is compared by content only (Incus gives it a mode of its own);
    the backup.yaml Incus writes into a volume on import is left out."""
    top = f"{item.path}/backup/"
    members = sorted(where, key=len, reverse=True)

    def locate(path: str) -> tuple[Path, bool] | None:
        relative = path.removeprefix(top)
        member = next((m for m in members if relative.startswith(m + "/") or relative == m), None)
        if member is None or not path.startswith(top):
            return None
        rest = relative.removeprefix(member).lstrip("/")
        if rest == INCUS_WRITES:
            return None
        if not rest:  # the member itself: only a block volume's image, never a directory
            return (where[member], False) if member.endswith(".img") else None
        return where[member] / rest, True

    return locate
