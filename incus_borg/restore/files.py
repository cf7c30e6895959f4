"""`incus-borg restore files`: files or directories out of an instance or a volume, owned as
inside the instance."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..context import Context
from ..errors import UserError
from ..manifest import Item
from .source import Source, open_run
from .target import find_item, holding, report


@dataclass
class FilesOptions:
    """What `restore files` was asked for."""

    archive: str
    ref: str  # [P/]NAME of an instance, or POOL/[P/]NAME of a volume
    paths: tuple[str, ...]
    dest: Path
    label: str | None = None


def run(ctx: Context, options: FilesOptions) -> None:
    """Restore the files the options name."""
    source = open_run(
        ctx, options.archive, options.label, latest=holding(options.ref, "instance", "volume")
    )
    restore(source, options.ref, options.paths, options.dest)


def restore(source: Source, ref: str, paths: tuple[str, ...], dest: Path) -> None:
    """Copy files or directories out of an instance's (or volume's) data into `dest`."""
    item = _files_item(source, ref)
    if item.kind == "instance":
        base = f"{item.path}/backup/container/rootfs"
        idmap = _instance_idmap(source, item)
    elif item.type == "block":
        raise UserError(
            f"volume {item.pool}/{item.ref} is a block volume: it holds no files; restore it "
            "with `incus-borg restore volume`"
        )
    else:
        base = f"{item.path}/backup/volume"
        idmap = _volume_idmap(source, item)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [f"{base}/{p.strip('/')}" for p in paths]
    source.extract(item, wanted, len(Path(base).parts), dest)
    absent = [p for p in paths if not os.path.lexists(dest / p.strip("/"))]
    if absent:
        raise UserError(f"{', '.join(absent)}: not in {item.ref} in {source.description}")
    if idmap:
        for path in paths:
            _unshift(dest / path.strip("/"), idmap)
    for path in paths:
        report(f"{item.ref}:{path} -> {dest / path.strip('/')}")


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
    backup = yaml.safe_load(source.read(f"{item.path}/backup/container/backup.yaml", item))
    raw = backup["container"]["config"].get("volatile.last_state.idmap") or "[]"
    return list(json.loads(raw))


def _volume_idmap(source: Source, item: Item) -> list[dict[str, Any]]:
    index = yaml.safe_load(source.read(f"{item.path}/backup/index.yaml", item))
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
