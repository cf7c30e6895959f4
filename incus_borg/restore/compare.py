"""Restored files compared with the archive's own record of them (`borg list` with {sha256},
mode and owner: nothing extra is read at backup time)."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path
from typing import Any

from .. import layout
from ..manifest import Item

INCUS_WRITES = "backup.yaml"  # in each volume's top directory: Incus writes its own on import


def same(entry: dict[str, Any], path: Path, modes: bool = True) -> bool:
    """Whether a restored file has the archived content, and (with `modes`) mode and owner."""
    try:
        st = path.lstat()
    except OSError:
        return False
    if modes and (stat.filemode(st.st_mode), st.st_uid, st.st_gid) != (
        entry["mode"],
        entry["uid"],
        entry["gid"],
    ):
        return False
    if stat.S_ISREG(st.st_mode):
        with path.open("rb") as f:
            return bool(hashlib.file_digest(f, "sha256").hexdigest() == entry["sha256"])
    return True


def places(incus_dir: Path, pool: str, item: Item) -> dict[str, Path]:
    """An instance's or volume's members below its `backup/` -> where they are in a pool."""
    if item.kind == "instance":
        return layout.instance_places(incus_dir, pool, item.project, item.name, item.snapshots)
    block = item.type == "block"
    return layout.volume_places(incus_dir, pool, item.project, item.name, item.snapshots, block)


def differing(listing: str, item: Item, where: dict[str, Path]) -> tuple[int, list[str]]:
    """How many archived files of an item were compared with what is at `where` (see
    `places`), and those (paths below `backup/`) that differ. `listing` is borg's JSON lines
    of the item's `backup/` tree. A block volume's image is compared by content only (Incus
    gives it a mode of its own)."""
    top = f"{item.path}/backup/"
    members = sorted(where, key=len, reverse=True)
    compared, wrong = 0, []
    for entry in map(json.loads, listing.splitlines()):
        relative = entry["path"].removeprefix(top)
        member = next((m for m in members if relative.startswith(m + "/") or relative == m), None)
        rest = relative.removeprefix(member or "").lstrip("/")
        file_member = member is not None and entry["type"] != "d" and relative == member
        if member is None or (not rest and not file_member) or rest == INCUS_WRITES:
            continue
        compared += 1
        if not same(entry, where[member] / rest if rest else where[member], modes=not file_member):
            wrong.append(relative)
    return compared, wrong
