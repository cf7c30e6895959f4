"""A run's entities as a dependency graph: references, selection and creation order.

Pure functions only: no root, no Incus, no borg.
"""

from __future__ import annotations

from typing import Any

import pytest

from incus_borg.errors import UserError
from incus_borg.manifest import Item
from incus_borg.restore.graph import Graph, Node, Owners, build, closure, order


def item(kind: str, project: str, name: str, pool: str) -> Item:
    path = f"{kind}s/{project}/{name}"
    kind_type = "container" if kind == "instance" else "filesystem"
    return Item(kind, project, name, pool, "dir", kind_type, [], "Running", "idle", path)


DEFINITIONS: dict[str, list[dict[str, Any]]] = {
    "projects": [
        {"name": "default", "config": {"features.profiles": "true", "features.networks": "true"}},
        # p2 uses default's profiles and networks, its own volumes.
        {
            "name": "p2",
            "config": {"features.profiles": "false", "features.storage.volumes": "true"},
        },
        # p3 has profiles and networks of its own.
        {"name": "p3", "config": {"features.profiles": "true", "features.networks": "true"}},
    ],
    "storage-pools": [{"name": "slow", "driver": "dir"}, {"name": "fast", "driver": "btrfs"}],
    "network-zones": [{"name": "example.net", "project": "default"}],
    "network-acls": [
        # Each names the other in its rules: created first, their rules set afterwards.
        {"name": "web", "project": "default", "ingress": [{"source": "admin,10.0.0.0/8"}]},
        {"name": "admin", "project": "default", "egress": [{"destination": "web,@internal"}]},
    ],
    "networks": [
        {
            "name": "br0",
            "project": "default",
            "config": {"security.acls": "web", "dns.zone.forward": "example.net"},
        },
        {"name": "ovn0", "project": "p3", "type": "ovn", "config": {"network": "br0"}},
    ],
    "profiles": [
        {
            "name": "default",
            "project": "default",
            "devices": {
                "root": {"type": "disk", "path": "/", "pool": "slow"},
                "eth0": {"type": "nic", "network": "br0"},
            },
        },
        {
            "name": "data",
            "project": "default",
            "devices": {"d": {"type": "disk", "path": "/d", "pool": "slow", "source": "shared"}},
        },
        {
            "name": "default",
            "project": "p3",
            "devices": {"eth0": {"type": "nic", "network": "ovn0"}},
        },
    ],
    "instances": [
        {"name": "c1", "project": "p2", "profiles": ["default", "data"], "devices": {}},
        {
            "name": "c3",
            "project": "p3",
            "profiles": ["default"],
            "devices": {"v": {"type": "disk", "path": "/v", "pool": "fast", "source": "own"}},
        },
    ],
}
INSTANCES = [item("instance", "p2", "c1", "fast"), item("instance", "p3", "c3", "slow")]
# `shared` is the volume of default's profile `data`; `own` is p3's.
VOLUMES = [item("volume", "default", "shared", "slow"), item("volume", "p3", "own", "fast")]


@pytest.fixture
def graph() -> Graph:
    return build(DEFINITIONS, INSTANCES, VOLUMES)


def n(kind: str, project: str, name: str, pool: str = "") -> Node:
    return Node(kind, project, name, pool)


def test_references(graph: Graph) -> None:
    deps = graph.deps
    assert deps[n("networks", "default", "br0")] == {
        n("network-acls", "default", "web"),
        n("network-zones", "default", "example.net"),
        n("projects", "", "default"),
    }
    assert n("networks", "default", "br0") in deps[n("networks", "p3", "ovn0")]  # its uplink
    assert deps[n("network-acls", "default", "web")] == {n("projects", "", "default")}
    assert deps[n("network-acl-rules", "default", "web")] == {
        n("network-acls", "default", "web"),
        n("network-acls", "default", "admin"),
        n("projects", "", "default"),
    }
    assert deps[n("profiles", "default", "data")] == {
        n("storage-pools", "", "slow"),
        n("storage-volumes", "default", "shared", "slow"),
        n("projects", "", "default"),
    }
    # c1 (in p2) takes its profiles from default; c3 its volume from p3.
    assert deps[n("instances", "p2", "c1")] == {
        n("projects", "", "p2"),
        n("storage-pools", "", "fast"),
        n("profiles", "default", "default"),
        n("profiles", "default", "data"),
    }
    assert n("storage-volumes", "p3", "own", "fast") in deps[n("instances", "p3", "c3")]
    assert n("profiles", "p3", "default") in deps[n("instances", "p3", "c3")]


def test_order_puts_everything_after_what_it_needs(graph: Graph) -> None:
    ordered = order(graph, graph.definitions)
    assert sorted(ordered, key=Node.sort_key) == sorted(graph.definitions, key=Node.sort_key)
    position = {node: i for i, node in enumerate(ordered)}
    for node, needs in graph.deps.items():
        for need in needs:
            assert position[need] < position[node], (need.label, node.label)
    kinds = [node.kind for node in ordered]
    assert kinds[:5] == ["projects"] * 3 + ["storage-pools"] * 2
    assert kinds[-2:] == ["instances", "instances"]
    assert ordered.index(n("network-acl-rules", "default", "web")) > ordered.index(
        n("network-acls", "default", "admin")
    )


def test_closure_of_an_instance_is_what_it_needs(graph: Graph) -> None:
    needed = closure(graph, [n("instances", "p2", "c1")])
    assert n("instances", "p3", "c3") not in needed
    assert n("networks", "p3", "ovn0") not in needed
    for wanted in (
        n("projects", "", "p2"),
        n("projects", "", "default"),
        n("storage-pools", "", "fast"),
        n("storage-pools", "", "slow"),
        n("networks", "default", "br0"),
        n("network-acls", "default", "web"),
        n("network-acl-rules", "default", "web"),  # an ACL comes with its rules ...
        n("network-acls", "default", "admin"),  # ... and what they name
        n("network-zones", "default", "example.net"),
        n("storage-volumes", "default", "shared", "slow"),
    ):
        assert wanted in needed, wanted.label


def test_references_in_a_circle_are_refused() -> None:
    definitions: dict[str, list[dict[str, Any]]] = {
        "projects": [{"name": "default"}],
        "networks": [
            {"name": "a", "config": {"network": "b"}},
            {"name": "b", "config": {"network": "a"}},
        ],
    }
    graph = build(definitions, [], [])
    with pytest.raises(UserError, match="network default/a, network default/b"):
        order(graph, graph.definitions)


def test_owners_follow_project_features() -> None:
    owners = Owners(DEFINITIONS["projects"] + [{"name": "bare", "config": {}}])
    assert owners("profiles", "p2") == "default"
    assert owners("storage-volumes", "p2") == "p2"
    assert owners("networks", "p3") == "p3"
    # Without the keys, Incus's defaults: own profiles and volumes, default's networks.
    assert owners("profiles", "bare") == "bare"
    assert owners("networks", "bare") == "default"
    assert owners("network-zones", "bare") == "default"
    assert owners("profiles", "default") == "default"


def test_labels() -> None:
    assert n("projects", "", "p2").label == "project p2"
    assert n("storage-pools", "", "fast").label == "storage pool fast"
    assert n("storage-volumes", "p3", "own", "fast").label == "volume fast/p3/own"
    assert n("network-acl-rules", "default", "web").label == "rules of network ACL default/web"
