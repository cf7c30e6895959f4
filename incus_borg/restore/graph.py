"""A run's entities as a dependency graph: what refers to what, which entities a selection
needs, and the order that creates each one after everything it refers to.

Nodes are named by kind, project and name (volumes also by pool). References come from the
archived definitions: a project's features decide whose profiles, networks, zones and volumes
its entities use; devices name pools, volumes, networks and network ACLs; networks name their
uplink, ACLs and DNS zones; ACL rules name other ACLs. An ACL's rules are a node of their own
(`network-acl-rules`), set once every ACL exists, so that ACLs may name each other.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..manifest import Item

# Creation order where references leave a choice (and the order of a plan's sections).
KINDS = (
    "projects",
    "storage-pools",
    "network-zones",
    "network-acls",
    "networks",
    "network-acl-rules",
    "profiles",
    "storage-volumes",
    "instances",
)
SERVER_WIDE = ("projects", "storage-pools")
WORDS = {
    "projects": "project",
    "storage-pools": "storage pool",
    "network-zones": "network zone",
    "network-acls": "network ACL",
    "network-acl-rules": "rules of network ACL",
    "networks": "network",
    "storage-volumes": "volume",
    "profiles": "profile",
    "instances": "instance",
}
# Which project's entities of a kind a project uses: its own when the feature is on.
FEATURES = {
    "profiles": ("features.profiles", True),
    "networks": ("features.networks", False),
    "network-acls": ("features.networks", False),
    "network-zones": ("features.networks.zones", False),
    "storage-volumes": ("features.storage.volumes", True),
}
DNS_ZONE_KEYS = ("dns.zone.forward", "dns.zone.reverse.ipv4", "dns.zone.reverse.ipv6")


@dataclass(frozen=True)
class Node:
    """One entity: kind, project ("" for server-wide kinds), name, and a volume's pool."""

    kind: str
    project: str
    name: str
    pool: str = ""

    @property
    def label(self) -> str:
        """How messages name it: `project P`, `storage pool P`, `network P/N`,
        `volume POOL/P/N`, `instance P/N`."""
        if self.kind in SERVER_WIDE:
            return f"{WORDS[self.kind]} {self.name}"
        pool = f"{self.pool}/" if self.pool else ""
        return f"{WORDS[self.kind]} {pool}{self.project}/{self.name}"

    def sort_key(self) -> tuple[int, str, str, str]:
        return (KINDS.index(self.kind), self.project, self.pool, self.name)


@dataclass
class Graph:
    """The entities of a run with their definitions (and data items), and what each needs."""

    definitions: dict[Node, dict[str, Any]] = field(default_factory=dict)
    items: dict[Node, Item] = field(default_factory=dict)  # instances and volumes with data
    deps: dict[Node, set[Node]] = field(default_factory=dict)

    def add(self, node: Node, definition: dict[str, Any], item: Item | None = None) -> None:
        self.definitions[node] = definition
        self.deps[node] = set()
        if item is not None:
            self.items[node] = item

    def of_kind(self, kind: str) -> list[Node]:
        return sorted((n for n in self.definitions if n.kind == kind), key=Node.sort_key)


class Owners:
    """Whose entities each archived project uses (its own, or the default project's)."""

    def __init__(self, projects: Iterable[dict[str, Any]]) -> None:
        self.configs = {p["name"]: p.get("config") or {} for p in projects}

    def __call__(self, kind: str, project: str) -> str:
        key, default = FEATURES[kind]
        value = self.configs.get(project, {}).get(key)
        own = default if value is None else str(value).lower() == "true"
        return project if own or project == "default" else "default"


def _names(value: Any) -> list[str]:
    return [n.strip() for n in str(value or "").split(",") if n.strip()]


def device_refs(devices: dict[str, dict[str, Any]], project: str, owners: Owners) -> list[Node]:
    """The pools, volumes, networks and ACLs some devices name."""
    refs = []
    for device in devices.values():
        if device.get("type") == "disk" and device.get("pool"):
            refs.append(Node("storage-pools", "", device["pool"]))
            if device.get("source") and device.get("path") != "/":
                owner = owners("storage-volumes", project)
                refs.append(Node("storage-volumes", owner, device["source"], device["pool"]))
        elif device.get("type") == "nic":
            owner = owners("networks", project)
            if device.get("network"):
                refs.append(Node("networks", owner, device["network"]))
            refs += [Node("network-acls", owner, a) for a in _names(device.get("security.acls"))]
    return refs


def network_refs(network: dict[str, Any], owners: Owners) -> list[Node]:
    """The uplink network, ACLs and DNS zones a network names."""
    project = network.get("project", "default")
    config = network.get("config") or {}
    refs = [Node("network-acls", project, a) for a in _names(config.get("security.acls"))]
    if config.get("network"):
        refs.append(Node("networks", "default", config["network"]))  # uplinks live there
    zone_owner = owners("network-zones", project)
    refs += [
        Node("network-zones", zone_owner, z) for k in DNS_ZONE_KEYS for z in _names(config.get(k))
    ]
    return refs


def acl_refs(acl: dict[str, Any]) -> list[Node]:
    """The other ACLs an ACL's rules name as a source or destination."""
    project = acl.get("project", "default")
    names = {
        name
        for rule in [*(acl.get("ingress") or []), *(acl.get("egress") or [])]
        for side in ("source", "destination")
        for name in _names(rule.get(side))
        if name[0].isalpha() and not any(c in name for c in ".:/")
    }
    return [Node("network-acls", project, n) for n in sorted(names)]


def build(
    definitions: dict[str, list[dict[str, Any]]], instances: list[Item], volumes: list[Item]
) -> Graph:
    """The graph of a run: its archived definitions, and its instances and volumes (the
    manifest's items, which have data)."""
    graph = Graph()
    owners = Owners(definitions.get("projects") or [])
    refs: dict[Node, list[Node]] = {}
    for kind in (
        "projects",
        "storage-pools",
        "network-zones",
        "network-acls",
        "networks",
        "profiles",
    ):
        for definition in definitions.get(kind) or []:
            project = "" if kind in SERVER_WIDE else definition.get("project", "default")
            node = Node(kind, project, definition["name"])
            graph.add(node, definition)
            refs[node] = _refs(kind, definition, owners)
            if kind == "network-acls":
                rules = Node("network-acl-rules", project, definition["name"])
                graph.add(rules, definition)
                refs[rules] = [node, *acl_refs(definition)]
    archived = {
        (d.get("project", "default"), d["name"]): d for d in definitions.get("instances") or []
    }
    for item in volumes:
        node = Node("storage-volumes", item.project, item.name, item.pool)
        graph.add(node, {}, item)
        refs[node] = [Node("storage-pools", "", item.pool)]
    for item in instances:
        definition = archived.get((item.project, item.name), {})
        node = Node("instances", item.project, item.name)
        graph.add(node, definition, item)
        profile_owner = owners("profiles", item.project)
        refs[node] = [Node("storage-pools", "", item.pool)]
        refs[node] += [Node("profiles", profile_owner, p) for p in definition.get("profiles") or []]
        refs[node] += device_refs(definition.get("devices") or {}, item.project, owners)
    for node, named in refs.items():
        project = [Node("projects", "", node.project)] if node.project else []
        graph.deps[node] = {r for r in [*project, *named] if r in graph.definitions and r != node}
    return graph


def _refs(kind: str, definition: dict[str, Any], owners: Owners) -> list[Node]:
    if kind == "networks":
        return network_refs(definition, owners)
    if kind == "profiles":
        project = definition.get("project", "default")
        return device_refs(definition.get("devices") or {}, project, owners)
    return []


def closure(graph: Graph, roots: Iterable[Node]) -> set[Node]:
    """The roots and everything they need, directly or not (an ACL with its rules)."""
    wanted: set[Node] = set()
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node not in wanted:
            wanted.add(node)
            todo += graph.deps[node]
            if node.kind == "network-acls":
                todo.append(Node("network-acl-rules", node.project, node.name))
    return wanted


def order(graph: Graph, nodes: Iterable[Node]) -> list[Node]:
    """The nodes in creation order: each after those it needs (among `nodes`), ties broken
    by kind (KINDS), then project, pool and name. Refuses references in a circle."""
    chosen = set(nodes)
    waiting = {n: graph.deps[n] & chosen for n in chosen}
    users: dict[Node, list[Node]] = {n: [] for n in chosen}
    for node, needs in waiting.items():
        for need in needs:
            users[need].append(node)
    ready = [(n.sort_key(), n) for n, needs in waiting.items() if not needs]
    heapq.heapify(ready)
    ordered: list[Node] = []
    while ready:
        _, node = heapq.heappop(ready)
        ordered.append(node)
        for user in users[node]:
            waiting[user].discard(node)
            if not waiting[user]:
                heapq.heappush(ready, (user.sort_key(), user))
    if len(ordered) < len(chosen):
        circle = sorted((n for n in chosen if n not in ordered), key=Node.sort_key)
        raise UserError(
            "these archived entities refer to each other in a circle: "
            f"{', '.join(n.label for n in circle)}; create one of them by hand first"
        )
    return ordered
