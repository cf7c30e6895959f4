"""Recreating projects, networks and profiles from their archived definitions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from .incus import Incus, api_path

KINDS = ("projects", "networks", "profiles")  # dependency order
# What each kind's create (POST) and update (PUT) take from a definition.
WRITABLE = {
    "projects": ("description", "config"),
    "networks": ("description", "config"),
    "profiles": ("description", "config", "devices"),
}
FEATURE = {"networks": "features.networks", "profiles": "features.profiles"}


@dataclass
class Outcome:
    """What a recreation did and left alone."""

    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def owner_project(incus: Incus, kind: str, project: str) -> str | None:
    """The project whose `kind` a project uses (its own, or default's); None for projects."""
    if kind == "projects":
        return None
    config = incus.query(api_path(f"/1.0/projects/{quote(project)}"))["config"]
    return project if config.get(FEATURE[kind]) == "true" else "default"


def existing(incus: Incus, kind: str, project: str | None) -> set[str]:
    """Names of the entities of `kind` that exist now."""
    urls = incus.query(api_path(f"/1.0/{kind}", project))
    return {u.rsplit("/", 1)[-1].split("?")[0] for u in urls}


def label(kind: str, definition: dict[str, Any]) -> str:
    """How an entity is named in messages."""
    singular = kind.removesuffix("s")
    if kind == "projects":
        return f"{singular} {definition['name']}"
    return f"{singular} {definition.get('project', 'default')}/{definition['name']}"


def recreate(
    incus: Incus,
    wanted: dict[str, list[dict[str, Any]]],
    replace: bool,
    report: Callable[[str], None],
) -> Outcome:
    """Create the wanted definitions that are missing (in dependency order); with `replace`,
    overwrite those that exist."""
    outcome = Outcome()
    for kind in KINDS:
        for definition in wanted.get(kind, []):
            project = None if kind == "projects" else definition.get("project", "default")
            name = definition["name"]
            body = {k: definition[k] for k in WRITABLE[kind] if k in definition}
            what = label(kind, definition)
            if kind == "networks" and not definition.get("managed", True):
                continue
            if name in existing(incus, kind, project):
                if not replace:
                    outcome.kept.append(what)
                    continue
                incus.query(api_path(f"/1.0/{kind}/{quote(name)}", project), "PUT", body)
                outcome.replaced.append(what)
            else:
                if kind == "networks":
                    body["type"] = definition.get("type", "bridge")
                incus.query(api_path(f"/1.0/{kind}", project), "POST", {"name": name, **body})
                outcome.created.append(what)
            report(
                f"{what}: {'replaced' if what in outcome.replaced else 'created'} from the archive"
            )
    return outcome
