"""Restored files compared with the archive's own record of them (`borg list` with {sha256},
mode and owner: nothing extra is read at backup time).

Borg records a file with several names once, under the first name it met, and each further
name as a hard link (its mode starts with `h`, its `source` is the first name, and it has no
digest of its own). A hard link is compared by the content of the file it links to, and all
the names of one file must be one inode on disk: the names restored apart from the inode
most of them share are the ones reported.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections import Counter
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
    groups: dict[str, list[str]] = {}  # a file's first name -> all its names
    for entry in entries:
        if is_hard_link(entry):
            source = str(entry["source"])
            groups.setdefault(source, [source]).append(str(entry["path"]))
    apart = {path for names in groups.values() for path in _apart(names, locate)}
    compared, wrong = 0, []
    for entry in entries:
        found = locate(entry["path"])
        if found is None:
            continue
        compared += 1
        if entry["path"] in apart or not _same(entry, *found, by_path):
            wrong.append(entry["path"])
    return compared, wrong


def _apart(names: list[str], locate: Locate) -> set[str]:
    """The names of one hard-linked file that were not restored as the one inode most of
    them share (on a tie, the first name's)."""
    inodes = {}
    for name in names:
        where = locate(name)
        if where is None:
            continue
        try:
            st = where[0].lstat()
        except OSError:
            continue  # missing: `_same` reports it
        inodes[name] = (st.st_dev, st.st_ino)
    if not inodes:
        return set()
    counts = Counter(inodes.values())
    most = max(counts.values())
    first = inodes.get(names[0])
    shared = first if first is not None and counts[first] == most else counts.most_common(1)[0][0]
    return {name for name, inode in inodes.items() if inode != shared}


def _same(
    entry: dict[str, Any],
    path: Path,
    modes: bool,
    by_path: dict[str, dict[str, Any]],
) -> bool:
    """Whether a restored item has the archived content (for a hard link: its file's), and
    (with `modes`) mode and owner."""
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
    if stat.S_ISREG(st.st_mode):
        with path.open("rb") as f:
            return bool(hashlib.file_digest(f, "sha256").hexdigest() == record["sha256"])
    return True


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
