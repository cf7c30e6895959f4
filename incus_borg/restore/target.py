"""What a restore names and where it goes: the item in the run, the pool and project on this
server, and the check that what came back is what was archived."""

from __future__ import annotations

from typing import Any

import click

from ..errors import UserError
from ..incus import Incus
from ..manifest import Item
from .source import Source, definitions


def report(line: str) -> None:
    """Say what a restore did."""
    click.echo(line)


def find_item(source: Source, kind: str, ref: str) -> Item:
    """The instance ([P/]NAME) or volume (POOL/[P/]NAME) named `ref` in the run."""
    items = source.manifest.instances if kind == "instance" else source.manifest.volumes
    parts = ref.split("/")
    if kind == "instance":
        if len(parts) > 2:
            raise UserError(f"{ref!r}: name an instance as NAME or PROJECT/NAME")
        found = [
            i for i in items if i.name == parts[-1] and (len(parts) == 1 or i.project == parts[0])
        ]
    else:
        if not 2 <= len(parts) <= 3:
            raise UserError(f"{ref!r}: name a volume as POOL/NAME or POOL/PROJECT/NAME")
        found = [
            i
            for i in items
            if i.pool == parts[0]
            and i.name == parts[-1]
            and (len(parts) == 2 or i.project == parts[1])
        ]
    if not found:
        known = ", ".join(i.ref if kind == "instance" else f"{i.pool}/{i.ref}" for i in items)
        raise UserError(f"no {kind} {ref!r} in {source.description} (it holds: {known or 'none'})")
    if len(found) > 1:
        raise UserError(f"{kind} {ref!r} is ambiguous in {source.description}: add the project")
    return found[0]


def require_pool(incus: Incus, pool: str) -> dict[str, Any]:
    """The definition of a pool of this server; refuses one that does not exist."""
    known = {p["name"]: p for p in incus.pools()}
    if pool not in known:
        raise UserError(
            f"no storage pool {pool!r} on this server (it has: {', '.join(sorted(known))})"
        )
    return dict(known[pool])


def missing_project(incus: Incus, source: Source, project: str) -> list[dict[str, Any]]:
    """The archived definition of the target project when it must be created first (empty
    when it exists); refuses a project that exists neither here nor in the archive."""
    if project in incus.entity_names("projects", None):
        return []
    archived = [p for p in definitions(source, "projects") if p["name"] == project]
    if not archived:
        raise UserError(f"no project {project!r} here nor in the archive: create it first")
    return archived


def check_snapshots(what: str, found: list[str], expected: list[str]) -> None:
    """Verify that an import brought back exactly the archived snapshots."""
    if sorted(found) != sorted(expected):
        raise UserError(
            f"{what} was imported with snapshots {found}, expected {expected}: check it before use"
        )
