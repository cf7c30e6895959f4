"""`incus-borg list [ARCHIVE]`: the runs in each repository, or what one run holds."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import click

from .. import layout
from ..borg import list_argv
from ..context import Context
from ..restore.source import Source, definitions, open_run

ENTITY_KINDS = ("projects", "profiles", "networks", "storage-pools", "images")


def run(ctx: Context, archive: str | None, label: str | None, as_json: bool) -> None:
    """Print the runs of every selected repository, or what one run (ARCHIVE) holds."""
    if archive:
        show(open_run(ctx, archive, label), as_json)
        return
    borg = ctx.borg()
    listing: dict[str, list[dict[str, Any]]] = {}
    for repo in ctx.config.select_repositories(label):
        archives = borg.run(list_argv(repo), repo).json()["archives"]
        runs = [a for a in archives if not layout.is_part(a["name"])]
        parts = [layout.run_of(a["name"]) for a in archives if layout.is_part(a["name"])]
        listing[repo.name] = [
            {"name": a["name"], "time": a["time"], "parts": parts.count(a["name"])} for a in runs
        ]
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    for name, runs in listing.items():
        click.echo(f"repository {name}: {len(runs)} run(s)")
        for entry in runs:
            when = entry["time"][:19].replace("T", " ")
            click.echo(f"  {when}  {entry['name']}  ({entry['parts']} instance/volume archives)")


def show(source: Source, as_json: bool) -> None:
    """Print what one run holds: instances, volumes and entities."""
    manifest = source.manifest
    entities = {kind: sorted(_names(source, kind)) for kind in ENTITY_KINDS}
    if as_json:
        data = dataclasses.asdict(manifest) | {"entities": entities}
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(
        f"run {manifest.run} from {manifest.hostname}, {manifest.created} ({source.description})"
    )
    click.echo(
        f"incus {manifest.incus_version}, mode {manifest.mode}, database {manifest.database}"
    )
    click.echo(
        f"{'KIND':9} {'PROJECT':10} {'NAME':20} {'POOL':10} {'DRIVER':7} {'TYPE':10} {'STATE':8} SNAPSHOTS"
    )
    for item in manifest.instances + manifest.volumes:
        click.echo(
            f"{item.kind:9} {item.project:10} {item.name:20} {item.pool:10} {item.driver:7} "
            f"{item.type:10} {item.state or '-':8} {', '.join(item.snapshots) or '-'}"
        )
    for kind, names in entities.items():
        click.echo(f"{kind}: {', '.join(names) or '-'}")


def _names(source: Source, kind: str) -> list[str]:
    return [
        d.get("fingerprint", "")[:12] if kind == "images" else d["name"]
        for d in definitions(source, kind)
    ]
