"""`incus-borg list`: the archives in each repository."""

from __future__ import annotations

import json
from typing import Any

import click

from ..borg import Borg, list_argv
from ..config import Config


def run(config: Config, borg: Borg, label: str | None, as_json: bool) -> None:
    """Print the archives of every selected repository, as a table or as JSON."""
    listing: dict[str, list[dict[str, Any]]] = {}
    for repo in config.select_repositories(label):
        archives = borg.run(list_argv(repo), repo).json()["archives"]
        listing[repo.name] = [{"name": a["name"], "time": a["time"]} for a in archives]
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    for name, archives in listing.items():
        click.echo(f"repository {name}: {len(archives)} archive(s)")
        for archive in archives:
            click.echo(f"  {archive['time'][:19].replace('T', ' ')}  {archive['name']}")
