"""Rebuilding a run onto a server: the plan (every entity in creation order, each to create,
to update, already here, or colliding), and carrying it out step by step.

Pools are mapped (`poolmap`): an archived pool's volumes, instances and the devices naming it
go to the pool it maps to. What exists is never changed, except what Incus made by itself
and nobody changed since, which the archive's definition replaces (losing nothing): the
default project as Incus makes it, each project's `default` profile (Incus makes it with a
project that has profiles of its own, so a project the plan creates brings one), and any
profile that exists unused with neither config nor devices. What the plan knows will fail
is a collision, found before anything changes: a bridge whose name an interface of the
server's host has, a network whose parent interface is missing, a pool whose source path
does not exist.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..incus import Incus
from ..manifest import Item
from . import graph, instance, volume
from .graph import Graph, Node
from .journal import RestoreJournal
from .poolmap import PoolMap, creation
from .source import Source, definitions
from .target import report

CREATE, UPDATE, EXISTS, COLLIDE = "create", "update", "exists", "collide"
# The default project's config as Incus makes it: its features, all on (they cannot change).
DEFAULT_PROJECT_FEATURES = (
    "features.images",
    "features.networks",
    "features.networks.zones",
    "features.profiles",
    "features.storage.buckets",
    "features.storage.volumes",
)
# Network types whose host interface is named after the network.
NAMED_INTERFACES = ("bridge",)
DEFINED = ("projects", "storage-pools", "network-zones", "network-acls", "networks", "profiles")
# What a created entity takes from its archived definition.
FIELDS = {
    "projects": ("name", "description", "config"),
    "network-zones": ("name", "description", "config"),
    "network-acls": ("name", "description", "config"),  # the rules come once all ACLs exist
    "network-acl-rules": ("description", "config", "ingress", "egress"),
    "networks": ("name", "description", "type", "config"),
    "profiles": ("name", "description", "config", "devices"),
}


@dataclass
class Step:
    """One entity of the plan, and what happens to it."""

    node: Node  # as archived
    action: str  # CREATE, UPDATE, EXISTS or COLLIDE
    detail: str = ""

    def line(self) -> str:
        """The step as the plan prints it."""
        return f"  {self.action:<7} {self.node.label}{self.detail}"


@dataclass
class Plan:
    """What `restore all` does, decided before anything changes."""

    source: Source
    graph: Graph
    pools: dict[str, PoolMap]  # every archived pool -> where its volumes go
    steps: list[Step]
    member: str | None = None  # the cluster member its instances and volumes go to

    def pool(self, archived: str) -> str:
        """The pool here that an archived pool maps to."""
        return self.pools[archived].new if archived in self.pools else archived

    @property
    def renamed(self) -> dict[str, str]:
        """Archived pools that map to a pool of another name (old -> new)."""
        return {old: m.new for old, m in self.pools.items() if m.new != old}

    @property
    def collisions(self) -> list[Step]:
        """The steps that cannot be carried out here."""
        return [step for step in self.steps if step.action == COLLIDE]

    def action(self, node: Node) -> str | None:
        """What the plan does with a node it holds (None: not in the plan)."""
        return next((step.action for step in self.steps if step.node == node), None)


@dataclass
class Outcome:
    """What carrying out a plan did, step by step."""

    created: list[Node] = field(default_factory=list)
    updated: list[Node] = field(default_factory=list)  # as Incus made them, now as archived
    kept: list[Node] = field(default_factory=list)
    failed: dict[Node, str] = field(default_factory=dict)
    seconds: dict[Node, float] = field(default_factory=dict)
    exit_code: int = 0


def read_graph(source: Source) -> Graph:
    """The run's entities: its archived definitions and the instances and volumes whose
    data it holds."""
    defined = {kind: definitions(source, kind) for kind in DEFINED}
    defined["instances"] = definitions(source, "instances")
    manifest = source.manifest
    usable = [i for i in manifest.instances if not i.failed]
    return graph.build(defined, usable, [v for v in manifest.volumes if not v.failed])


def complete_map(graph_: Graph, maps: dict[str, PoolMap]) -> dict[str, PoolMap]:
    """Every archived pool with where it goes (unmapped pools keep their name); refuses a
    --pool-map naming a pool that the run does not have."""
    archived = {n.name for n in graph_.of_kind("storage-pools")}
    archived |= {i.pool for i in graph_.items.values()}
    unknown = sorted(set(maps) - archived)
    if unknown:
        raise UserError(
            f"--pool-map names pool {unknown[0]!r}, which the run does not have "
            f"(it has: {', '.join(sorted(archived)) or 'none'})"
        )
    return {old: maps.get(old, PoolMap(old, old)) for old in sorted(archived)}


class Here:
    """What this server holds, named as the plan names it after mapping (pools renamed)."""

    def __init__(self, incus: Incus, pools: Iterable[str], member: str | None = None) -> None:
        self.found: dict[Node, dict[str, Any]] = {}
        self.drivers = incus.storage_drivers()
        self.interfaces: set[str] = set()  # the host's network interfaces, as Incus sees them
        for project in incus.entities("projects"):
            self.found[Node("projects", "", project["name"])] = project
        for pool in incus.pools():
            self.found[Node("storage-pools", "", pool["name"])] = pool
        for kind in ("network-zones", "network-acls", "networks", "profiles", "instances"):
            for entity in incus.entities(kind):
                if kind == "networks" and not entity.get("managed"):
                    self.interfaces.add(entity["name"])
                    continue
                node = Node(kind, entity.get("project", "default"), entity["name"])
                self.found[node] = entity
                if kind == "network-acls":
                    self.found[Node("network-acl-rules", node.project, node.name)] = entity
        for name in set(pools) & {n.name for n in self.found if n.kind == "storage-pools"}:
            for vol in incus.custom_volumes(name):
                # On a cluster, a volume name is per member: one elsewhere is not here.
                elsewhere = member is not None and vol.get("location") not in (member, "", None)
                if "/" not in vol["name"] and not elsewhere:
                    node = Node("storage-volumes", vol["project"], vol["name"], name)
                    self.found[node] = vol


def make_plan(
    incus: Incus,
    source: Source,
    graph_: Graph,
    pools: dict[str, PoolMap],
    nodes: set[Node],
    member: str | None = None,
) -> Plan:
    """Every step, in creation order, each to create or already here; refuses before
    anything changes what cannot work (a pool driver this server lacks, a mapped pool that
    exists with another driver, items whose data the run lacks)."""
    items = [graph_.items[n] for n in nodes if n in graph_.items]
    lacking = source.missing(items)
    if lacking:
        names = ", ".join(f"{i.kind} {i.ref}" for i in lacking)
        raise UserError(f"{source.description} lacks the data of {names}: choose another run")
    plan = Plan(source, graph_, pools, [], member)
    here = Here(incus, {m.new for m in pools.values()}, member)
    for node in graph.order(graph_, nodes):
        plan.steps.append(_step(plan, here, node))
    return plan


def here_node(plan: Plan, node: Node) -> Node:
    """The node as this server names it (pools mapped)."""
    if node.kind == "storage-pools":
        return Node(node.kind, "", plan.pool(node.name))
    if node.kind == "storage-volumes":
        return Node(node.kind, node.project, node.name, plan.pool(node.pool))
    return node


def _step(plan: Plan, here: Here, node: Node) -> Step:
    existing = here.found.get(here_node(plan, node))
    if node.kind == "storage-pools":
        return _pool_step(plan, here, node, existing)
    item = plan.graph.items.get(node)
    if item is not None:
        return Step(node, EXISTS if existing else CREATE, _item_detail(plan, item, existing))
    body = body_of(plan, node)
    if existing is None:
        made = _made_with_its_project(plan, node)
        if made:
            return Step(node, UPDATE, made)
        collision = _network_collision(here, node, body)
        return Step(node, COLLIDE, collision) if collision else Step(node, CREATE)
    differs = [k for k, v in body.items() if k != "name" and existing.get(k) != v]
    made = _as_incus_made_it(node, existing)
    if made and differs:
        return Step(node, UPDATE, made)
    return Step(
        node, EXISTS, ": left alone" + (" (it differs from the archive)" if differs else "")
    )


def blank(profile: dict[str, Any]) -> bool:
    """Whether a profile has neither config nor devices (as Incus makes `default`), and
    nothing uses it."""
    return not profile.get("config") and not profile.get("devices") and not profile.get("used_by")


def _made_with_its_project(plan: Plan, node: Node) -> str | None:
    """Why an entity missing here will exist once the plan created its project (Incus makes
    a `default` profile with every project that has profiles of its own), or None."""
    if node.kind != "profiles" or node.name != "default" or node.project == "default":
        return None
    project = Node("projects", "", node.project)
    config = plan.graph.definitions.get(project, {}).get("config") or {}
    if plan.action(project) == CREATE and config.get("features.profiles") == "true":
        return f": Incus makes it with project {node.project}; filled from the archive"
    return None


def _as_incus_made_it(node: Node, existing: dict[str, Any]) -> str | None:
    """Why an existing entity is as Incus made it, with nothing of an admin's to lose (so
    that the archive's definition replaces it), or None."""
    if node.kind == "profiles" and blank(existing):
        return ": exists here unused, with neither config nor devices; filled from the archive"
    config = existing.get("config") or {}
    if node == Node("projects", "", "default") and set(config) <= set(DEFAULT_PROJECT_FEATURES):
        return ": exists here as Incus makes it; its config and description from the archive"
    return None


def _network_collision(here: Here, node: Node, body: dict[str, Any]) -> str:
    """Why a network cannot be created here ("" when it can): its bridge would take the name
    of an interface of the host, or its parent interface is missing."""
    if node.kind != "networks":
        return ""
    if body.get("type") in NAMED_INTERFACES and node.name in here.interfaces:
        return (
            f": this server's host has a network interface named {node.name}, which the bridge "
            "would be: rename or remove that interface first"
        )
    parent = (body.get("config") or {}).get("parent")
    if parent and parent not in here.interfaces:
        return (
            f": its parent interface {parent} does not exist on this server's host: create it "
            "first (or restore with --project to leave the network out)"
        )
    return ""


def _pool_step(plan: Plan, here: Here, node: Node, existing: dict[str, Any] | None) -> Step:
    mapping = plan.pools[node.name]
    body = creation(plan.graph.definitions.get(node, {"name": node.name}), mapping)
    driver = body.get("driver")
    named = f" as {mapping.new}" if mapping.new != node.name else ""
    if existing is not None:
        if mapping.driver is not None and existing["driver"] != mapping.driver:
            raise UserError(
                f"--pool-map {mapping.spec}: pool {mapping.new} exists here with driver "
                f"{existing['driver']}: map onto it as {node.name}={mapping.new}, or name a new pool"
            )
        return Step(node, EXISTS, f"{named}: used as it is ({existing['driver']})")
    if driver not in here.drivers:
        raise UserError(
            f"storage pool {node.name} cannot be created here: this server has no {driver} "
            f"driver (it has: {', '.join(sorted(here.drivers))}); map it with "
            f"--pool-map {node.name}=NEW[:DRIVER]"
        )
    source = str(body["config"].get("source", ""))
    if source.startswith("/") and not os.path.exists(source):
        return Step(
            node,
            COLLIDE,
            f"{named}: its source {source} does not exist on this host: create it, or map the "
            f"pool with --pool-map {node.name}=NEW[:DRIVER[:source=...]]",
        )
    settings = ", ".join(f"{k}={v}" for k, v in sorted(body["config"].items()))
    return Step(node, CREATE, f"{named} ({driver}{': ' + settings if settings else ''})")


def _item_detail(plan: Plan, item: Item, existing: dict[str, Any] | None) -> str:
    if existing is not None:
        return ": left alone"
    kind = f"{item.type}, " if item.kind == "volume" else ""
    running = ", running at backup time" if item.state == "Running" else ""
    return f" onto pool {plan.pool(item.pool)} ({kind}{len(item.snapshots)} snapshot(s){running})"


def body_of(plan: Plan, node: Node) -> dict[str, Any]:
    """What creates a definition's entity here: its archived fields, runtime keys left out,
    profile devices on the mapped pools."""
    definition = plan.graph.definitions[node]
    body = {k: definition[k] for k in FIELDS[node.kind] if k in definition}
    if "config" in body:
        body["config"] = {k: v for k, v in body["config"].items() if not k.startswith("volatile.")}
    if node.kind == "networks":
        body.setdefault("type", "bridge")
    if "devices" in body:
        body["devices"] = {
            name: {**d, "pool": plan.pool(d["pool"])} if d.get("pool") else d
            for name, d in body["devices"].items()
        }
    return body


def apply(incus: Incus, plan: Plan, step: Step, journal: RestoreJournal) -> int:
    """Carry out one step that creates (or fills) something; the exit code it warrants."""
    node, project = step.node, step.node.project
    item = plan.graph.items.get(node)
    if node.kind == "instances" and item is not None:
        return instance.restore(incus, plan.source, instance_options(plan, item), journal)
    if node.kind == "storage-volumes" and item is not None:
        restore_volume(incus, plan, item)
        return 0
    if node.kind == "storage-pools":
        incus.create_pool(creation(plan.graph.definitions[node], plan.pools[node.name]))
    elif node.kind == "network-zones":
        incus.create_network_zone(project, body_of(plan, node))
    elif node.kind == "network-acls":
        incus.create_network_acl(project, body_of(plan, node))
    elif node.kind == "network-acl-rules":
        incus.update_network_acl(project, node.name, body_of(plan, node))
    elif step.action == UPDATE:
        incus.update_entity(node.kind, project or None, node.name, update_body(incus, plan, node))
    else:
        incus.create_entity(node.kind, project or None, body_of(plan, node))
    verb = "updated from the archive (as Incus made it)" if step.action == UPDATE else "created"
    report(f"{here_node(plan, node).label}: {verb}")
    return 0


def update_body(incus: Incus, plan: Plan, node: Node) -> dict[str, Any]:
    """What replaces an entity Incus made: its archived fields; the default project keeps
    its features (Incus refuses to change them)."""
    body = body_of(plan, node)
    body.pop("name", None)
    if node.kind == "projects":
        here = incus.project(node.name).get("config") or {}
        archived = body.get("config") or {}
        body["config"] = {k: v for k, v in archived.items() if not k.startswith("features.")}
        body["config"] |= {k: v for k, v in here.items() if k.startswith("features.")}
    return body


# Each instance and volume is restored with the options made by the two functions below:
# options that apply to every object (such as the cluster member it goes to) are added there.


def instance_options(plan: Plan, item: Item) -> instance.InstanceOptions:
    """How one instance is restored: onto the pool its own maps to, its devices' pools
    mapped, onto the plan's cluster member."""
    return instance.InstanceOptions(
        item.ref, pool=plan.pool(item.pool), pool_map=plan.renamed, target=plan.member
    )


def restore_volume(incus: Incus, plan: Plan, item: Item) -> None:
    """Restore one custom volume, with its snapshots, onto the pool its own maps to (and
    the plan's cluster member)."""
    volume.restore(incus, plan.source, item, None, plan.pool(item.pool), None, plan.member)


def carry_out(
    incus: Incus, plan: Plan, journal: RestoreJournal, keep_going: bool = False
) -> Outcome:
    """Create what the plan creates, in order. A failure stops at once with exit 2 naming
    what was created; with `keep_going` it is recorded, and what needs it is skipped."""
    outcome = Outcome()
    for step in plan.steps:
        node = step.node
        if step.action == EXISTS:
            outcome.kept.append(node)
            continue
        if step.action == COLLIDE:
            outcome.failed[node] = f"not restored: {step.detail.removeprefix(': ')}"
            continue
        blocked = sorted(plan.graph.deps[node] & outcome.failed.keys(), key=Node.sort_key)
        if blocked:
            outcome.failed[node] = f"not restored: it needs {blocked[0].label}, which failed"
            continue
        started = time.monotonic()
        try:
            outcome.exit_code = max(outcome.exit_code, apply(incus, plan, step, journal))
        except KeyboardInterrupt:
            if keep_going:
                raise
            raise stopped(plan, node, "interrupted", outcome) from None
        except Exception as exc:
            if not keep_going:
                raise stopped(plan, node, str(exc), outcome) from None
            outcome.failed[node] = str(exc)
            report(f"{node.label}: failed: {exc}")
            continue
        outcome.seconds[node] = time.monotonic() - started
        (outcome.updated if step.action == UPDATE else outcome.created).append(node)
    return outcome


def stopped(plan: Plan, node: Node, why: str, outcome: Outcome) -> UserError:
    """The error of a rebuild that stopped part-way: what it created, and what to do."""
    created = ", ".join(here_node(plan, n).label for n in outcome.created) or "nothing"
    updated = ", ".join(here_node(plan, n).label for n in outcome.updated)
    return UserError(
        f"restore all stopped at {here_node(plan, node).label}: {why}; created before it: "
        f"{created}{'; updated from the archive: ' + updated if updated else ''}; run the "
        "same command again to continue (what exists is skipped), or delete what it created"
    )
