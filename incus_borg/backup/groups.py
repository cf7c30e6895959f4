"""Consistency groups: instances captured at one moment.

A group is declared in the configuration (`groups:`, by the admin, across projects) or by
the `user.incus-borg.group=NAME` key of an instance or its profile. A key's group gathers
only instances of the instance's own project (a tenant's key never reaches another
tenant's instances): it is named PROJECT/NAME. The configuration's word counts over a key.

The plan checks each group before anything is quiesced, and reads its members one after
another, so that a run holds them together only while they are read: a snapshot group is
frozen, snapshotted and thawed at once (capture.py), a freeze or stop group stays held from
its first member's read to its last one's (reader.py, keeper.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..config import Group as Declared
from ..errors import UserError
from ..manifest import Group, Item

CONFIGURATION = "configuration"
GROUPED_MODES = ("snapshot", "freeze", "stop")  # what a running member may be quiesced by


@dataclass(frozen=True)
class Membership:
    """An instance's group, as its policy or the configuration declares it."""

    group: str
    source: str  # "configuration", or where its key was set ("instance", "profile NAME")


def key_group(project: str, name: str) -> str:
    """The name of the group a `user.incus-borg.group` key of an instance of `project` names."""
    return f"{project}/{name}"


def gather(
    planned: list[Item],
    keys: dict[str, Membership],
    declared: Sequence[Declared],
    elsewhere: dict[str, str | None],
    notes: list[str],
    volumes: Sequence[Item] = (),
) -> list[Group]:
    """Put the planned instances (`planned`, skipped ones too) in their groups (`keys`: by
    ref, what their keys say; `declared`: the configuration's), with the custom volumes
    only their running members use (see `_attach`), and check each group; on a cluster,
    `elsewhere` holds the instances on other members (ref -> the group their key names).
    Sets each member's `group`; returns the groups, in the order of `planned`."""
    here = {i.ref for i in planned}
    member_of = dict(keys)
    for group in declared:
        for full in group.refs:
            if full in elsewhere:
                elsewhere[full] = group.name
            if full not in here:
                continue
            if full in member_of:
                notes.append(
                    f"instance {full}: in group {group.name} (configuration); its "
                    f"user.incus-borg.group (set on the {member_of[full].source}) is not used"
                )
            member_of[full] = Membership(group.name, CONFIGURATION)
    members: dict[str, list[Item]] = {}
    for item in planned:
        if item.ref in member_of:
            item.group = member_of[item.ref].group
            members.setdefault(item.group, []).append(item)
    sources = {m.group: m.source for m in member_of.values()}
    attached = _attach(planned, volumes, notes)
    groups = []
    for name, items in members.items():
        mine = [v for v in attached if v.group == name]
        _check(name, items + mine, [ref for ref, group in elsewhere.items() if group == name])
        refs = [i.ref for i in items]
        groups.append(Group(name, refs, _mode(items + mine), sources[name], volumes=_refs(mine)))
    return groups


def _attach(instances: Sequence[Item], volumes: Sequence[Item], notes: list[str]) -> list[Item]:
    """Put each custom volume that only one group's running members use in that group (it
    is captured at the group's moment, read right after its instances); returns them. A
    volume read through Incus's export is read on its own, said in a note."""
    group_of = {i.ref: i.group for i in instances}
    attached = []
    for volume in volumes:
        owners = {group_of.get(user) for user in volume.users}
        if not volume.users or len(owners) != 1 or None in owners:
            continue
        (group,) = owners
        if volume.exported:
            notes.append(
                f"volume {_refs([volume])[0]}: read on its own, not at group {group}'s moment: "
                "it is read through Incus's export"
            )
            continue
        volume.group = group
        attached.append(volume)
    return attached


def _refs(volumes: Sequence[Item]) -> list[str]:
    return [f"{v.pool}/{v.project}/{v.name}" for v in volumes]


def contiguous(instances: list[Item]) -> list[Item]:
    """The instances in their order, but each group's members read one after another, from
    where its first member is."""
    ordered: list[Item] = []
    for item in instances:
        if item in ordered:
            continue
        ordered += [item] if item.group is None else [i for i in instances if i.group == item.group]
    return ordered


def spans(items: Sequence[Item]) -> dict[int, range]:
    """For every item that is in a group (by its index in `items`, where each group's members
    are contiguous), the indexes of its group's members."""
    found: dict[int, range] = {}
    start = 0
    for k in range(1, len(items) + 1):
        if k == len(items) or items[k].group is None or items[k].group != items[start].group:
            if items[start].group is not None:
                for j in range(start, k):
                    found[j] = range(start, k)
            start = k
    return found


def _mode(items: list[Item]) -> str:
    modes = {i.mode for i in items} - {"idle"}
    return modes.pop() if modes else "idle"


def _check(name: str, items: list[Item], elsewhere: list[str]) -> None:
    """Refuse a group that no run can capture at one moment."""
    if elsewhere:
        raise UserError(
            f"group {name} spans cluster members: {items[0].ref} is here, {elsewhere[0]} is "
            "on another member; a group's instances must be on one member: move them together"
        )
    for item in items:
        if item.mode == "skip":
            raise UserError(
                f"group {name}: {item.kind} {item.ref} has mode skip (from {item.mode_source}): "
                "take it out of the group, or give it another mode"
            )
        if item.mode == "none":
            raise UserError(
                f"group {name}: {item.kind} {item.ref} has mode none (from {item.mode_source}), "
                "read live, which no group can hold at one moment: give it mode freeze or "
                "snapshot"
            )
        if item.exported:
            raise UserError(
                f"group {name}: instance {item.ref} ({item.driver}, {item.type}) is read "
                "through Incus's export, which a group cannot hold at one moment: take it out "
                "of the group"
            )
    modes = {i.mode: i for i in items if i.mode in GROUPED_MODES}
    if len(modes) > 1:
        shown = ", ".join(
            f"{i.kind} {i.ref} {mode} ({i.driver})" for mode, i in sorted(modes.items())
        )
        raise UserError(
            f"group {name} mixes modes ({shown}): set user.incus-borg.mode to one mode on all "
            "its instances and the volumes they use (freeze works on every pool)"
        )


HOW = {
    "snapshot": "frozen, snapshotted and thawed together",
    "freeze": "frozen together for the whole group's read (bounded by max_window)",
    "stop": "stopped together for the whole group's read (bounded by max_window)",
    "idle": "none running: read as they are",
}


def planned(group: Group) -> str:
    """What a run will do with a group, in words."""
    return f"group {group.name} (from the {group.source}): {', '.join(group.members)}: {HOW[group.mode]}"


def as_read(group: Group, instances: Sequence[Item]) -> Group:
    """The group as a run read it: the members it left out (a failed pre command, a failed
    quiesce) are named apart."""
    failed = {i.ref for i in instances if i.failed is not None}
    every = group.members + group.left_out
    group.left_out = [ref for ref in every if ref in failed]
    group.members = [ref for ref in every if ref not in failed]
    return group


def done(group: Group) -> str:
    """What a run did with a group, in words."""
    members = ", ".join(group.members)
    if group.left_out:
        members += f" (left out of the run: {', '.join(group.left_out)})"
    if group.window is None:
        return f"group {group.name}: {members}: not held ({group.mode})"
    what = {"snapshot": "frozen for their snapshots", "freeze": "frozen", "stop": "stopped"}
    said = f"{what[group.mode]} together at {group.at} for {group.window:.2f} s"
    if group.mode != "snapshot":
        said += " (the whole group's read)"
    return f"group {group.name}: {members}: {said}"
