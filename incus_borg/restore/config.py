"""`incus-borg restore config`: projects, pools, networks and profiles recreated from their
archived definitions, in dependency order (also used by the other restores for what they need).

On a cluster, a pool or network is made as Incus requires: pending on each member with that
member's own keys (the `member_config` a member's run recorded, such as a pool's `source` or
a macvlan network's `parent`), then created cluster-wide with the common config. If that
fails, the pending records are deleted again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import layout
from ..context import Context
from ..errors import UserError
from ..incus import Incus
from .source import Source, definitions, open_run
from .target import report

KINDS = ("projects", "storage-pools", "networks", "profiles")  # dependency order
# What each kind's create (POST) and update (PUT) take from a definition.
WRITABLE = {
    "projects": ("description", "config"),
    "storage-pools": ("description", "config"),
    "networks": ("description", "config"),
    "profiles": ("description", "config", "devices"),
}
# What a create takes besides, and its default: a network's type, a pool's driver.
CREATE_ONLY = {"networks": ("type", "bridge"), "storage-pools": ("driver", "dir")}
FEATURE = {"networks": "features.networks", "profiles": "features.profiles"}
SERVER_WIDE = ("projects", "storage-pools")  # kinds that belong to no project


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
    singular = kind.removesuffix("s").replace("storage-", "")
    if kind in SERVER_WIDE:
        return f"{singular} {definition['name']}"
    return f"{singular} {definition.get('project', 'default')}/{definition['name']}"


def recreate(
    incus: Incus,
    wanted: dict[str, list[dict[str, Any]]],
    replace: bool,
    report: Callable[[str], None],
) -> Outcome:
    """Create the wanted definitions that are missing (in dependency order); with `replace`,
    overwrite those that exist (their cluster-wide fields: per-member keys are set only when
    a pool or network is created)."""
    outcome = Outcome()
    members: list[str] | None = None  # the cluster's members, asked for once when needed
    for kind in KINDS:
        for definition in wanted.get(kind, []):
            project = None if kind in SERVER_WIDE else definition.get("project", "default")
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
                if kind in CREATE_ONLY and members is None:
                    members = _members(incus)
                _create(incus, kind, project, definition, body, members or [])
                outcome.created.append(what)
            report(
                f"{what}: {'replaced' if what in outcome.replaced else 'created'} from the archive"
            )
    return outcome


def _members(incus: Incus) -> list[str]:
    """The names of the cluster's members (none when the server is not clustered)."""
    return [m["server_name"] for m in incus.cluster_members()] if incus.member() else []


def _create(
    incus: Incus,
    kind: str,
    project: str | None,
    definition: dict[str, Any],
    writable: dict[str, Any],
    members: list[str],
) -> None:
    """Create one entity from its writable fields. A pool or network of a cluster
    (`members`) is made pending on each member with that member's own keys, then created
    cluster-wide; the pending records are deleted if that fails."""
    body = {"name": definition["name"], **writable}
    if kind not in CREATE_ONLY:
        incus.create_entity(kind, project, body)
        return
    field, default = CREATE_ONLY[kind]
    body[field] = definition.get(field, default)
    body["config"] = _settable(body.get("config") or {})
    archived = definition.get(layout.MEMBER_CONFIG) or {}
    pending = False
    try:
        for member in members:
            own = {"name": body["name"], field: body[field]}
            own["config"] = _settable(archived.get(member) or {})
            incus.create_entity(kind, project, own, target=member)
            pending = True
        incus.create_entity(kind, project, body)
    except UserError as exc:
        if not members:
            raise
        if pending:
            incus.delete_entity(kind, project, body["name"])
        unknown = [m for m in members if m not in archived]
        hint = f" (the run has no per-member config for {', '.join(unknown)})" if unknown else ""
        raise UserError(f"{label(kind, definition)}: {exc}{hint}; nothing was created") from None


def _settable(config: dict[str, Any]) -> dict[str, Any]:
    """A pool's or network's config without the keys Incus sets itself (`volatile.*`)."""
    return {k: v for k, v in config.items() if not k.startswith("volatile.")}


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
