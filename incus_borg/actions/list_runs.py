"""`incus-borg list [ARCHIVE]`: the runs in each repository, or what one run holds."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click

from .. import runs
from ..backup import groups
from ..context import Context
from ..restore.source import Source, definitions, open_run

ENTITY_KINDS = ("projects", "profiles", "networks", "storage-pools", "images")
OLDEST = "0.1.0 or older"  # manifests began to name the incus-borg that wrote them after 0.1.0


def run(ctx: Context, archive: str | None, label: str | None, as_json: bool) -> None:
    """Print the runs of every selected repository, or what one run (ARCHIVE) holds."""
    if archive:
        show(open_run(ctx, archive, label), as_json)
        return
    borg = ctx.borg()
    listing = {
        repo.name: [entry(run) for run in runs.find(borg, repo)]
        for repo in ctx.config.select_repositories(label)
    }
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    for name, entries in listing.items():
        count = sum(1 for e in entries if e["state"] != runs.INCOMPLETE)
        click.echo(f"repository {name}: {count} run(s)")
        for e in entries:
            when = e["time"][:19].replace("T", " ")
            member = f"  member {e['member']}" if e["member"] else ""
            click.echo(f"  {when}  {e['name']}  {e['state'] or '-'}{member}  ({describe(e)})")


def entry(run: runs.Run) -> dict[str, Any]:
    """One run as `list --json` shows it."""
    return {
        "name": run.name,
        "time": run.start.isoformat(),
        "state": run.state,
        "member": run.member,
        "parts": run.parts,
        "archives": run.archives,
    }


def describe(e: dict[str, Any]) -> str:
    """What a run's line says about its archives."""
    if e["state"] == runs.INCOMPLETE:
        return f"{len(e['archives'])} archive(s) of an interrupted run; `prune` removes them"
    if e["state"] is None:
        return "made by another program"
    state = e["state"] or "complete"
    if e["parts"]:  # a run of format 1
        return f"{state}, {e['parts']} instance/volume archives"
    return f"{state}, one archive"


def show(source: Source, as_json: bool) -> None:
    """Print what one run holds: instances, volumes and entities."""
    manifest = source.manifest
    entities = {kind: sorted(_names(source, kind)) for kind in ENTITY_KINDS}
    if as_json:
        data = dataclasses.asdict(manifest) | {"entities": entities}
        click.echo(json.dumps(data, indent=2))
        return
    member = f" (cluster member {manifest.member})" if manifest.member else ""
    click.echo(
        f"run {manifest.run} from {manifest.hostname}{member}, {manifest.created} "
        f"({source.description})"
    )
    note = f" ({manifest.database_note})" if manifest.database_note else ""
    click.echo(
        f"incus {manifest.incus_version}, mode {manifest.mode}, database {manifest.database}"
        f"{note}, written by incus-borg {manifest.incus_borg_version or OLDEST}"
    )
    click.echo(
        f"{'KIND':9} {'PROJECT':10} {'NAME':20} {'POOL':10} {'DRIVER':7} {'TYPE':10} {'STATE':8} SNAPSHOTS"
    )
    for item in manifest.instances + manifest.volumes:
        click.echo(
            f"{item.kind:9} {item.project:10} {item.name:20} {item.pool:10} {item.driver:7} "
            f"{item.type:10} {'FAILED' if item.failed else item.state or '-':8} "
            f"{', '.join(item.snapshots) or '-'}"
        )
    for group in manifest.groups:
        click.echo(groups.done(group))
    for kind, names in entities.items():
        click.echo(f"{kind}: {', '.join(names) or '-'}")


def _names(source: Source, kind: str) -> list[str]:
    return [
        d.get("fingerprint", "")[:12] if kind == "images" else d["name"]
        for d in definitions(source, kind)
    ]
