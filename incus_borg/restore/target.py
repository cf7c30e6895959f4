"""What a restore names and where it goes: the item in the run, the pool and project on this
server, and the check that what came back is what was archived."""

from __future__ import annotations

import time
from typing import Any

import click

from ..errors import UserError
from ..incus import Incus
from ..manifest import Item, Manifest
from .source import Latest, Source, definitions


def report(line: str) -> None:
    """Say what a restore did."""
    click.echo(line)


def find_item(source: Source, kind: str, ref: str) -> Item:
    """The instance ([P/]NAME) or volume (POOL/[P/]NAME) named `ref` in the run."""
    problem = _ref_problem(kind, ref)
    if problem:
        raise UserError(problem)
    found = matching(source.manifest, kind, ref)
    held = [i for i in found if i.failed is None]
    if found and not held:
        raise UserError(
            f"{kind} {ref!r} was left out of {source.description} ({found[0].failed}): "
            "restore it from another run"
        )
    found = held
    if not found:
        items = source.manifest.instances if kind == "instance" else source.manifest.volumes
        known = ", ".join(i.ref if kind == "instance" else f"{i.pool}/{i.ref}" for i in items)
        raise UserError(f"no {kind} {ref!r} in {source.description} (it holds: {known or 'none'})")
    if len(found) > 1:
        raise UserError(f"{kind} {ref!r} is ambiguous in {source.description}: add the project")
    return found[0]


def _ref_problem(kind: str, ref: str) -> str | None:
    """Why `ref` cannot name an item of `kind`, or None."""
    parts = len(ref.split("/"))
    if kind == "instance" and parts > 2:
        return f"{ref!r}: name an instance as NAME or PROJECT/NAME"
    if kind == "volume" and not 2 <= parts <= 3:
        return f"{ref!r}: name a volume as POOL/NAME or POOL/PROJECT/NAME"
    return None


def matching(manifest: Manifest, kind: str, ref: str) -> list[Item]:
    """The instances ([P/]NAME) or volumes (POOL/[P/]NAME) of a run that `ref` names; none
    when `ref` cannot name one of that kind."""
    parts = ref.split("/")
    if kind == "instance":
        if len(parts) > 2:
            return []
        return [
            i
            for i in manifest.instances
            if i.name == parts[-1] and (len(parts) == 1 or i.project == parts[0])
        ]
    if not 2 <= len(parts) <= 3:
        return []
    return [
        i
        for i in manifest.volumes
        if i.pool == parts[0] and i.name == parts[-1] and (len(parts) == 2 or i.project == parts[1])
    ]


def holding(ref: str, *kinds: str) -> Latest:
    """`latest` for a restore of `ref`: the newest run holding an item of one of `kinds`
    that `ref` names (refused at once when `ref` can name none)."""
    fitting = [kind for kind in kinds if not _ref_problem(kind, ref)]
    if not fitting:
        raise UserError(str(_ref_problem(kinds[0], ref)))
    return Latest(
        holds=lambda manifest: any(
            i.failed is None for kind in fitting for i in matching(manifest, kind, ref)
        ),
        what=f"{' or '.join(fitting)} {ref!r} in any run",
    )


def require_pool(incus: Incus, pool: str) -> dict[str, Any]:
    """The definition of a pool of this server; refuses one that does not exist."""
    known = {p["name"]: p for p in incus.pools()}
    if pool not in known:
        raise UserError(
            f"no storage pool {pool!r} on this server (it has: {', '.join(sorted(known))})"
        )
    return dict(known[pool])


def require_member(incus: Incus, target: str | None) -> str | None:
    """The cluster member a restore goes to: `target` (--target), by default the member
    where the command runs (None when the server is not clustered). Refuses a member that
    does not exist or does not answer, before anything is made."""
    here = incus.member()
    if target is None:
        return here
    if here is None:
        raise UserError(
            f"--target {target}: this server is not clustered; leave --target out to restore here"
        )
    members = {m["server_name"]: m for m in incus.cluster_members()}
    if target not in members:
        raise UserError(
            f"no cluster member {target!r}: --target takes one of {', '.join(sorted(members))}"
        )
    status = members[target].get("status", "")
    why = f"its status is {status}" if status in ("Offline", "Evacuated") else None
    why = why or (None if target == here else incus.member_answers(target))
    if why:
        raise UserError(
            f"cluster member {target} cannot take the restore ({why}): bring it back, or "
            "restore onto another member with --target"
        )
    return target


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


START_TIMEOUT = 60  # seconds a started instance may take to report Running


def start_and_wait(incus: Incus, project: str, name: str) -> float:
    """Start an instance and wait until it runs; the seconds that took. Refuses one still
    not running after START_TIMEOUT."""
    began = time.monotonic()
    incus.change_state(project, name, "start")
    while (status := incus.instance_status(project, name)) != "Running":
        if time.monotonic() - began > START_TIMEOUT:
            raise UserError(f"{project}/{name} is {status} {START_TIMEOUT} s after its start")
        time.sleep(0.2)
    return time.monotonic() - began
