"""`incus-borg restore config`: projects, networks and profiles recreated from their archived
definitions, in dependency order (also used by the other restores for what they need)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..context import Context
from ..errors import UserError
from ..incus import Incus
from .source import Source, definitions, open_run
from .target import report

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
    config = incus.project(project)["config"]
    return project if config.get(FEATURE[kind]) == "true" else "default"


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
            if name in incus.entity_names(kind, project):
                if not replace:
                    outcome.kept.append(what)
                    continue
                incus.update_entity(kind, project, name, body)
                outcome.replaced.append(what)
            else:
                if kind == "networks":
                    body["type"] = definition.get("type", "bridge")
                incus.create_entity(kind, project, {"name": name, **body})
                outcome.created.append(what)
            report(
                f"{what}: {'replaced' if what in outcome.replaced else 'created'} from the archive"
            )
    return outcome


@dataclass
class ConfigOptions:
    """What `restore config` was asked for."""

    archive: str
    kinds: list[str]  # of KINDS; empty means all
    names: tuple[str, ...] = ()
    replace: bool = False
    label: str | None = None


def run(ctx: Context, options: ConfigOptions) -> None:
    """Restore the definitions the options name."""
    source = open_run(ctx, options.archive, options.label)
    restore(ctx.incus(), source, options.kinds or list(KINDS), options.names, options.replace)


def restore(
    incus: Incus, source: Source, kinds: list[str], names: tuple[str, ...], replace: bool
) -> None:
    """Recreate projects, networks and profiles from the run's definitions."""
    wanted = {
        kind: [d for d in definitions(source, kind) if not names or d["name"] in names]
        for kind in kinds
    }
    if kinds and names:
        found = {d["name"] for defs in wanted.values() for d in defs}
        unknown = sorted(set(names) - found)
        if unknown:
            raise UserError(f"{', '.join(unknown)} not among the archive's {', '.join(kinds)}")
    outcome = recreate(incus, wanted, replace, report)
    for what in outcome.kept:
        report(f"{what}: exists, left alone (use --replace to overwrite it)")
    if not outcome.created and not outcome.replaced:
        report("nothing to recreate")
