"""Consistency groups: how instances are gathered and checked, read one after another, and
recorded (the edge cases; tests/test_groups.py drives them against a real daemon)."""

from __future__ import annotations

import pytest

from incus_borg.backup import groups
from incus_borg.backup.groups import Membership
from incus_borg.config import Group as Declared
from incus_borg.config import parse
from incus_borg.errors import UserError
from incus_borg.manifest import Group, Item, Manifest


def item(name: str, mode: str = "freeze", project: str = "default", **extra: object) -> Item:
    fields: dict[str, object] = {
        "kind": "instance", "project": project, "name": name, "pool": "p", "driver": "dir",
        "type": "container", "snapshots": [], "state": "Running", "mode": mode,
        "path": f"instances/{project}/{name}", "mode_source": "configuration",
    }  # fmt: skip
    return Item(**(fields | extra))  # type: ignore[arg-type]


def key(group: str, project: str = "default") -> Membership:
    return Membership(groups.key_group(project, group), "profile shop")


def test_a_key_group_is_its_project_s_and_the_configuration_counts_over_it() -> None:
    planned = [item("a"), item("b"), item("c", project="other")]
    keys = {"default/a": key("shop"), "default/b": key("shop"), "other/c": key("shop", "other")}
    notes: list[str] = []
    declared = [Declared("admins", ["default/b"])]
    found = groups.gather(planned, keys, declared, {}, notes)
    assert [(g.name, g.members, g.source) for g in found] == [
        ("default/shop", ["default/a"], "profile shop"),
        ("admins", ["default/b"], "configuration"),
        ("other/shop", ["other/c"], "profile shop"),
    ]
    assert notes and "default/b: in group admins (configuration)" in notes[0]


@pytest.mark.parametrize(
    ("members", "elsewhere", "wanted"),
    [
        ([item("a"), item("b", "snapshot", driver="btrfs")], {}, "mixes modes"),
        ([item("a"), item("b", "skip")], {}, "default/b has mode skip"),
        ([item("a"), item("b", "none")], {}, "default/b has mode none"),
        ([item("a"), item("b", reader="export", driver="zfs")], {}, "Incus's export"),
        ([item("a")], {"default/z": "default/g"}, "spans cluster members"),
    ],
)
def test_a_group_no_run_can_hold_at_one_moment_is_refused(
    members: list[Item], elsewhere: dict[str, str | None], wanted: str
) -> None:
    keys = {i.ref: key("g") for i in members}
    with pytest.raises(UserError, match=wanted):
        groups.gather(members, keys, [], dict(elsewhere), [])


def test_stopped_members_do_not_count_as_another_mode() -> None:
    planned = [item("a", "idle"), item("b", "snapshot")]
    (found,) = groups.gather(planned, {i.ref: key("g") for i in planned}, [], {}, [])
    assert found.mode == "snapshot"
    (idle,) = groups.gather([item("c", "idle")], {"default/c": key("h")}, [], {}, [])
    assert idle.mode == "idle"


def test_members_are_read_one_after_another_from_where_the_first_is() -> None:
    a, b, c, d = item("a", group="g"), item("b"), item("c", group="g"), item("d")
    ordered = groups.contiguous([a, b, c, d])
    assert [i.name for i in ordered] == ["a", "c", "b", "d"]
    assert groups.spans(ordered) == {0: range(0, 2), 1: range(0, 2)}
    e, f = item("e", group="h"), item("f", group="h")
    assert groups.spans([a, c, e, f, b]) == {
        0: range(0, 2), 1: range(0, 2), 2: range(2, 4), 3: range(2, 4)
    }  # fmt: skip


def test_the_manifest_keeps_its_groups_and_an_older_one_has_none() -> None:
    clock = Group("default/clock", ["default/a"], "freeze", "profile p", "2026-01-01T00:00:00", 1.5)
    manifest = Manifest("h", "r", "c", "6.0", "1.4", "auto", False, "exact", 1.0, groups=[clock])
    again = Manifest.from_json(manifest.to_json())
    assert again.groups == [clock]
    older = manifest.to_json().replace('"groups"', '"unknown"')
    assert Manifest.from_json(older).groups == []


@pytest.mark.parametrize(
    ("groups_yaml", "wanted"),
    [
        ("[{name: 'a b', instances: [x]}]", "is not a group name"),
        ("[{name: a, instances: []}]", "lists no instances"),
        ("[{name: a, instances: [x]}, {name: a, instances: [y]}]", "named twice"),
        ("[{name: a, instances: [x]}, {name: b, instances: [default/x]}]", "in groups a and b"),
    ],
)
def test_bad_configuration_groups_are_refused(groups_yaml: str, wanted: str) -> None:
    with pytest.raises(UserError, match=wanted):
        parse(f"groups: {groups_yaml}\n", "test.yaml")
