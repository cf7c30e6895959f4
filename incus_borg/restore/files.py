"""`incus-borg restore files`: files or directories out of an instance or a volume, owned as
inside the instance.

Every PATH and DIR are checked before anything is made. The files are extracted into a
temporary directory inside DIR first; they are moved into place only when none of them would
replace a file under DIR (unless `--overwrite`), so a refusal leaves DIR as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import yamlio
from ..context import Context
from ..errors import UserError
from ..manifest import Item
from .source import Source, open_run
from .target import find_item, holding, report

MAX_NAMED = 5  # existing files named in a refusal


@dataclass
class FilesOptions:
    """What `restore files` was asked for."""

    archive: str
    ref: str  # [P/]NAME of an instance, or POOL/[P/]NAME of a volume
    paths: tuple[str, ...]
    dest: Path
    label: str | None = None
    overwrite: bool = False


def run(ctx: Context, options: FilesOptions) -> None:
    """Restore the files the options name."""
    checked_paths(options.paths)
    check_dest(options.dest)
    source = open_run(
        ctx, options.archive, options.label, latest=holding(options.ref, "instance", "volume")
    )
    restore(source, options.ref, options.paths, options.dest, options.overwrite)


def checked_paths(paths: tuple[str, ...]) -> list[str]:
    """The PATHs relative to the instance's root; refuses one that would lead out of it."""
    relative = []
    for path in paths:
        parts = [part for part in path.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise UserError(f"{path}: a PATH may not contain '..'; name it from the root, as /a/b")
        relative.append("/".join(parts))
    return relative


def check_dest(dest: Path) -> None:
    """Refuse a DIR that exists and is not a directory."""
    if os.path.lexists(dest) and not dest.is_dir():
        raise UserError(f"--to {dest} exists and is not a directory: name a directory")


def restore(
    source: Source, ref: str, paths: tuple[str, ...], dest: Path, overwrite: bool = False
) -> None:
    """Copy files or directories out of an instance's (or volume's) data into `dest`."""
    wanted = checked_paths(paths)
    check_dest(dest)
    item = _files_item(source, ref)
    base, idmap = _base(source, item)
    made = [d for d in [dest, *dest.parents] if not d.exists()]
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".incus-borg-files-", dir=dest) as tmp:
            staged = Path(tmp)
            _extract(source, item, base, wanted, staged, paths)
            if idmap:
                for path in wanted:
                    _unshift(staged / path, idmap)
            _refuse_clashes(staged, dest, overwrite)
            _move_into(staged, dest)
    except BaseException:
        for directory in made:  # deepest first; only what this restore made, if still empty
            try:
                directory.rmdir()
            except OSError:
                break
        raise
    for path, relative in zip(paths, wanted, strict=True):
        report(f"{item.ref}:{path} -> {dest / relative}")


def _base(source: Source, item: Item) -> tuple[str, list[dict[str, Any]]]:
    """Where the item's files lie in the archive, and the idmap that shifted their owners."""
    if item.kind == "instance":
        return f"{item.path}/backup/container/rootfs", _instance_idmap(source, item)
    if item.type == "block":
        raise UserError(
            f"volume {item.pool}/{item.ref} is a block volume: it holds no files; restore it "
            "with `incus-borg restore volume`"
        )
    return f"{item.path}/backup/volume", _volume_idmap(source, item)


def _extract(
    source: Source,
    item: Item,
    base: str,
    wanted: list[str],
    staged: Path,
    paths: tuple[str, ...],
) -> None:
    """Extract the wanted paths into `staged`; refuses paths the item does not hold."""
    source.extract(item, [f"{base}/{p}".rstrip("/") for p in wanted], len(Path(base).parts), staged)
    absent = [p for p, rel in zip(paths, wanted, strict=True) if not os.path.lexists(staged / rel)]
    if absent:
        raise UserError(f"{', '.join(absent)}: not in {item.ref} in {source.description}")


def _clashes(staged: Path, dest: Path, prefix: str = "") -> tuple[list[str], list[str]]:
    """What the staged tree would replace under `dest`: files (and links...) that exist, and
    entries whose type differs (a directory against anything else)."""
    existing: list[str] = []
    mismatched: list[str] = []
    for entry in sorted(staged.iterdir()):
        target, name = dest / entry.name, f"{prefix}{entry.name}"
        if not os.path.lexists(target):
            continue
        entry_dir = entry.is_dir() and not entry.is_symlink()
        target_dir = target.is_dir() and not target.is_symlink()
        if entry_dir and target_dir:
            deeper = _clashes(entry, target, f"{name}/")
            existing += deeper[0]
            mismatched += deeper[1]
        else:
            (mismatched if entry_dir or target_dir else existing).append(name)
    return existing, mismatched


def _refuse_clashes(staged: Path, dest: Path, overwrite: bool) -> None:
    """Refuse, writing nothing, when the restore would replace what exists under `dest`."""
    existing, mismatched = _clashes(staged, dest)
    if mismatched:
        raise UserError(
            f"{_named(mismatched)} under {dest} would change between a directory and a file: "
            "move them away first (nothing was written)"
        )
    if existing and not overwrite:
        raise UserError(
            f"{_named(existing)} exist under {dest}: add --overwrite to replace them, or restore "
            "into another directory (nothing was written)"
        )


def _named(paths: list[str]) -> str:
    shown = ", ".join(paths[:MAX_NAMED])
    return shown + (f" and {len(paths) - MAX_NAMED} more" if len(paths) > MAX_NAMED else "")


def _move_into(staged: Path, dest: Path) -> None:
    """Move the staged tree into `dest`: new entries by renaming, existing directories by
    merging, existing files replaced (checked before)."""
    for entry in sorted(staged.iterdir()):
        target = dest / entry.name
        if os.path.lexists(target) and target.is_dir() and not target.is_symlink():
            _move_into(entry, target)
        else:
            os.replace(entry, target)


def _files_item(source: Source, ref: str) -> Item:
    """The instance ([P/]NAME) or volume (POOL/[P/]NAME) that `restore files` names.

    P/NAME and POOL/NAME look alike: an instance is tried first, and its error is the one
    reported when neither exists.
    """
    if ref.count("/") >= 2:
        return find_item(source, "volume", ref)
    try:
        return find_item(source, "instance", ref)
    except UserError as not_instance:
        if "/" not in ref:
            raise
        try:
            return find_item(source, "volume", ref)
        except UserError:
            raise not_instance from None


def _instance_idmap(source: Source, item: Item) -> list[dict[str, Any]]:
    if item.exported:  # the index comes first in Incus's stream, backup.yaml after the snapshots
        index = yamlio.load(source.read(f"{item.path}/backup/index.yaml", item))
        config = index["config"]["container"]["config"]
    else:
        backup = yamlio.load(source.read(f"{item.path}/backup/container/backup.yaml", item))
        config = backup["container"]["config"]
    return list(json.loads(config.get("volatile.last_state.idmap") or "[]"))


def _volume_idmap(source: Source, item: Item) -> list[dict[str, Any]]:
    index = yamlio.load(source.read(f"{item.path}/backup/index.yaml", item))
    raw = index["config"]["volume"]["config"].get("volatile.idmap.last") or "[]"
    return list(json.loads(raw))


def _unshift(root: Path, idmap: list[dict[str, Any]]) -> None:
    """Turn the on-disk (host) owners of extracted files into the ones seen inside."""

    def inside(host_id: int, is_uid: bool) -> int:
        for entry in idmap:
            if (entry["Isuid"] if is_uid else entry["Isgid"]) and 0 <= host_id - entry[
                "Hostid"
            ] < entry["Maprange"]:
                return int(entry["Nsid"] + host_id - entry["Hostid"])
        return host_id

    for path in [root, *root.rglob("*")] if root.is_dir() else [root]:
        st = path.lstat()
        os.lchown(path, inside(st.st_uid, True), inside(st.st_gid, False))
