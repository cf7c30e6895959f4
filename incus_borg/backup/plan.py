"""What a run will back up: instances and custom volumes, each with its reader (in place, or
through Incus's own export stream) and its quiesce mode."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import layout
from ..config import Group as Declared
from ..config import PolicyRules
from ..errors import UserError
from ..incus import Incus, instances_using
from ..manifest import Group, Item
from . import groups as groups_
from . import policy
from .policy import Policy

# Drivers whose snapshots are atomic copy-on-write: `auto` snapshots instead of freezing.
ATOMIC_SNAPSHOT_DRIVERS = {"btrfs", "zfs", "lvm", "ceph"}


@dataclass
class Plan:
    """Everything a run will read."""

    instances: list[Item]
    volumes: list[Item]
    pools: dict[str, str]  # name -> driver
    partial: bool = False  # only the named instances, not the whole server
    skipped: list[Item] = field(default_factory=list)  # left out by their policy (mode skip)
    # What the policies said: keys ignored (policy.keys_from), timeouts clamped.
    notes: list[str] = field(default_factory=list)
    # On a cluster: what other members hold (read by their own runs), as "kind ref (member)".
    elsewhere: list[str] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)  # consistency groups (see groups.py)

    @property
    def items(self) -> list[Item]:
        """Instances, then volumes, in the order they are read, each consistency group's
        members (its volumes last) one after another (not those left out of the run before
        it began, such as an instance whose pre command failed)."""
        return [i for i in groups_.contiguous(self.instances + self.volumes) if i.failed is None]


def reader_of(requested: str, driver: str, readable: bool) -> str:
    """How an item is read: through Incus's export stream when asked (`export`) or when its
    data cannot be read in place (`readable`: a container or filesystem volume on a dir or
    btrfs pool), else in place."""
    in_place = readable and driver in layout.READABLE_DRIVERS and requested != "export"
    return layout.IN_PLACE if in_place else layout.EXPORT


def effective_mode(
    requested: str,
    driver: str,
    running: bool,
    reader: str = layout.IN_PLACE,
    filesystem: bool = True,
) -> str:
    """The quiesce mode for one item: `auto` resolved, nothing to do when not running. An
    exported filesystem on a driver whose export Incus reads from its own snapshot is
    `snapshot` (nothing frozen); other exports are frozen while Incus makes them."""
    if requested in ("none", "skip"):
        return requested
    if not running:
        return "idle"
    if reader == layout.EXPORT:
        incus_snapshots = filesystem and driver in layout.EXPORT_SNAPSHOT_DRIVERS
        if requested in ("auto", "export"):
            return "snapshot" if incus_snapshots else "freeze"
        return requested
    if requested == "auto":
        return "snapshot" if driver in ATOMIC_SNAPSHOT_DRIVERS else "freeze"
    return requested


def check_export_mode(item: Item) -> None:
    """Refuse a snapshot that an exported item cannot get: Incus reads a snapshot of its own
    only for filesystems on btrfs and zfs."""
    snapshots = (
        item.type in ("container", "filesystem") and item.driver in layout.EXPORT_SNAPSHOT_DRIVERS
    )
    if item.reader == layout.EXPORT and item.mode == "snapshot" and not snapshots:
        raise UserError(
            f"{item.kind} {item.ref} ({item.driver}, {item.type}) is read through Incus's "
            f"export, which takes no snapshot of it: set its mode (from {item.mode_source}) to "
            "freeze, stop or none"
        )


def user_snapshots(names: list[str]) -> list[str]:
    """Snapshots that are the admin's (not a leftover temporary one of ours)."""
    return [n for n in names if not n.startswith(layout.SNAPSHOT_PREFIX)]


def build(
    incus: Incus,
    requested_mode: str,
    selection: list[str],
    command_line: str | None = None,
    member: str | None = None,
    rules: PolicyRules | None = None,
    declared: Sequence[Declared] = (),
) -> Plan:
    """Query Incus for every instance and custom volume, narrowed by `selection`, each with
    its policy (`command_line`: --mode, overriding every other source; `rules`: whose keys
    count, see policy.Trust) and its consistency group (`declared`: the configuration's
    groups); a bad policy key or group is refused here, before anything is quiesced. On a
    cluster (`member` is this member's name), only what is located on this member."""
    pools = {p["name"]: p["driver"] for p in incus.pools()}
    raw = incus.instances(recursion="1")
    notes: list[str] = []
    _check_declared(raw, declared)
    chosen = _select(raw, selection)
    if selection:
        chosen = _with_groups(raw, chosen, declared, notes)
    elsewhere = [i for i in chosen if member is not None and i["location"] != member]
    chosen = _with_snapshots(incus, [i for i in chosen if i not in elsewhere], pools)
    trust = _trust(incus, rules or PolicyRules())
    profiles = _profile_configs(incus, chosen + elsewhere)
    modes = (requested_mode, command_line, trust)
    policies = [_policy(i, profiles, *modes) for i in chosen]
    planned = [_instance_item(i, pools, p, notes) for i, p in zip(chosen, policies, strict=True)]
    keys = {
        item.ref: groups_.Membership(groups_.key_group(item.project, p.group), p.group_source)
        for item, p in zip(planned, policies, strict=True)
        if p.group is not None
    }
    away = {f"{i['project']}/{i['name']}": _key_group(i, profiles, modes) for i in elsewhere}
    instances = groups_.contiguous([i for i in planned if i.mode != "skip"])
    running = {f"{i['project']}/{i['name']}" for i in raw if i["status"] == "Running"}
    wanted = {i.ref for i in instances} if selection else None
    volumes, other_volumes = _volumes(incus, pools, modes, running, wanted, member, notes)
    skipped = [i for i in planned + volumes if i.mode == "skip"]
    volumes = [v for v in volumes if v.mode != "skip"]
    groups = groups_.gather(planned, keys, declared, away, notes, volumes)
    others = [f"instance {i['project']}/{i['name']} ({i['location']})" for i in elsewhere]
    return Plan(
        instances,
        volumes,
        pools,
        bool(selection),
        skipped=skipped,
        notes=notes,
        elsewhere=others + other_volumes,
        groups=groups,
    )


def _check_declared(raw: list[dict[str, Any]], declared: Sequence[Declared]) -> None:
    """Refuse a configuration group that names an instance this server does not have."""
    known = {f"{i['project']}/{i['name']}" for i in raw}
    for group in declared:
        for full in group.refs:
            if full not in known:
                raise UserError(
                    f"group {group.name} (configuration) names instance {full}, which is not on "
                    "this server: check `incus list --all-projects`, or take it out of groups"
                )


def _with_groups(
    raw: list[dict[str, Any]],
    chosen: list[dict[str, Any]],
    declared: Sequence[Declared],
    notes: list[str],
) -> list[dict[str, Any]]:
    """The named instances, and the other instances of their consistency groups (a group is
    read whole or not at all), as the keys and the configuration declare them (whose keys
    count is decided later: one more instance read is all an ignored key can cause)."""

    def ref(i: dict[str, Any]) -> str:
        return f"{i['project']}/{i['name']}"

    def key(i: dict[str, Any]) -> tuple[str, str | None]:
        return i["project"], (i.get("expanded_config") or {}).get(policy.PREFIX + "group")

    configured = [set(g.refs) for g in declared]
    wanted = list(chosen)
    for i in chosen:
        mine = [g for g in configured if ref(i) in g]
        if mine:
            mates = [j for j in raw if ref(j) in mine[0]]
        else:
            mates = [j for j in raw if key(i)[1] is not None and key(j) == key(i)]
        for j in mates:
            if j not in wanted:
                wanted.append(j)
                notes.append(f"instance {ref(j)}: read too, as a member of {ref(i)}'s group")
    return wanted


def _key_group(
    raw: dict[str, Any],
    profiles: dict[tuple[str, str], Any],
    modes: tuple[str, str | None, policy.Trust],
) -> str | None:
    """The group the key of an instance on another cluster member names (its keys are that
    member's run's to refuse)."""
    try:
        wanted = _policy(raw, profiles, *modes)
    except UserError:
        return None
    return groups_.key_group(raw["project"], wanted.group) if wanted.group else None


def _with_snapshots(
    incus: Incus, raw: list[dict[str, Any]], pools: dict[str, str]
) -> list[dict[str, Any]]:
    """The instances (this member's: another member's may be down, and is not asked for
    anything), each with the names of its snapshots (`snapshot_names`): one listing per
    pool that holds a root disk says which instances have any, and only those are asked
    for theirs."""
    having: set[tuple[str, str]] = set()
    for pool in sorted({_root_pool(i) for i in raw} & set(pools)):
        having |= incus.instances_with_snapshots(pool)
    listed = []
    for i in raw:
        key = (i["project"], i["name"])
        names = incus.instance_snapshots(*key) if key in having else []
        listed.append(i | {"snapshot_names": names})
    return listed


def _root_pool(raw: dict[str, Any]) -> str:
    """The pool of an instance's root disk."""
    return str((raw.get("expanded_devices") or {}).get("root", {}).get("pool", ""))


def _trust(incus: Incus, rules: PolicyRules) -> policy.Trust:
    """Whose keys count: the rules, and (when they depend on it) the restricted projects."""
    restricted: frozenset[str] = frozenset()
    if rules.keys_from == "unrestricted-projects":
        restricted = frozenset(
            p["name"]
            for p in incus.entities("projects")
            if str((p.get("config") or {}).get("restricted", "")).lower() == "true"
        )
    return policy.Trust(rules, restricted)


def _profile_configs(incus: Incus, raw: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    """Every profile's config by (project, name), when an instance inherits a policy key
    from one (else nothing is asked)."""
    inherits = any(
        key.startswith(policy.PREFIX) and key not in (i.get("config") or {})
        for i in raw
        for key in i.get("expanded_config") or {}
    )
    if not inherits:
        return {}
    return {(p["project"], p["name"]): p.get("config") or {} for p in incus.entities("profiles")}


def _policy(
    raw: dict[str, Any],
    profiles: dict[tuple[str, str], Any],
    requested: str,
    command_line: str | None,
    trust: policy.Trust,
) -> Policy:
    """An instance's policy; its profiles are its project's, or the default project's for a
    project without profiles of its own."""
    project = raw["project"]
    where = {
        name: project if (project, name) in profiles else "default"
        for name in raw.get("profiles") or []
    }
    mine = [(name, profiles.get((where[name], name), {})) for name in where]
    ref = f"{project}/{raw['name']}"
    return policy.instance_policy(ref, raw, mine, requested, command_line, trust, where)


def _select(raw: list[dict[str, Any]], selection: list[str]) -> list[dict[str, Any]]:
    if not selection:
        return sorted(raw, key=lambda i: (i["project"], i["name"]))
    chosen = []
    for wanted in selection:
        project, _, name = wanted.rpartition("/")
        found = [i for i in raw if i["name"] == name and (not project or i["project"] == project)]
        if not found:
            raise UserError(
                f"no instance {wanted!r} on this server: check `incus list --all-projects`"
            )
        if len(found) > 1:
            projects = ", ".join(f"{i['project']}/{name}" for i in found)
            raise UserError(f"instance {wanted!r} is ambiguous: name one of {projects}")
        chosen.append(found[0])
    return chosen


def _instance_item(
    raw: dict[str, Any], pools: dict[str, str], wanted: Policy, notes: list[str]
) -> Item:
    notes += wanted.notes
    pool = _root_pool(raw)
    driver = pools.get(pool, "")
    status = raw["status"]
    reader = reader_of(wanted.mode, driver, raw["type"] == "container")
    item = Item(
        kind="instance",
        project=raw["project"],
        name=raw["name"],
        pool=pool,
        driver=driver,
        type=raw["type"],
        snapshots=user_snapshots(raw["snapshot_names"]),
        state=status,
        mode=effective_mode(
            wanted.mode, driver, status == "Running", reader, raw["type"] == "container"
        ),
        path=str(layout.instance_stage(raw["project"], raw["name"])),
        mode_source=wanted.mode_source,
        excludes=_excludes(f"instance {raw['project']}/{raw['name']}", wanted, reader, notes),
        pre=wanted.pre,
        post=wanted.post,
        timeout=wanted.timeout if wanted.pre or wanted.post else None,
        reader=reader,
    )
    check_export_mode(item)
    return item


def _volumes(
    incus: Incus,
    pools: dict[str, str],
    modes: tuple[str, str | None, policy.Trust],
    running: set[str],
    wanted: set[str] | None,
    member: str | None,
    notes: list[str],
) -> tuple[list[Item], list[str]]:
    """Custom volumes: all, or (when instances were named) those the named instances use,
    each with its policy (skipped ones too); on a cluster, those on `member`, and the others
    named as "volume ref (member)"."""
    items: list[Item] = []
    elsewhere: list[str] = []
    for pool, driver in sorted(pools.items()):
        raw = _located(incus.custom_volumes(pool), member, pool, elsewhere)
        snaps: dict[tuple[str, str], list[str]] = {}
        for vol in raw:
            parent, _, snap = vol["name"].partition("/")
            if snap:
                snaps.setdefault((vol["project"], parent), []).append(snap)
        for vol in raw:
            users = [f"{p}/{n}" for p, n in instances_using(vol.get("used_by") or [])]
            if "/" in vol["name"] or (wanted is not None and not wanted & set(users)):
                continue
            ref = f"{pool}/{vol['project']}/{vol['name']}"
            chosen = policy.volume_policy(ref, vol, *modes)
            notes += chosen.notes
            snapshots = user_snapshots(snaps.get((vol["project"], vol["name"]), []))
            running_users = [u for u in users if u in running]
            items.append(_volume_item(vol, pool, driver, snapshots, running_users, chosen, notes))
    return sorted(items, key=lambda i: (i.pool, i.project, i.name)), elsewhere


def _volume_item(
    raw: dict[str, Any],
    pool: str,
    driver: str,
    snapshots: list[str],
    users: list[str],
    wanted: Policy,
    notes: list[str],
) -> Item:
    filesystem = raw["content_type"] != "block"
    reader = reader_of(wanted.mode, driver, filesystem)
    item = Item(
        kind="volume",
        project=raw["project"],
        name=raw["name"],
        pool=pool,
        driver=driver,
        type=raw["content_type"],
        snapshots=snapshots,
        state="",
        mode=effective_mode(wanted.mode, driver, bool(users), reader, filesystem),
        path=str(layout.volume_stage(pool, raw["project"], raw["name"])),
        users=users,
        mode_source=wanted.mode_source,
        excludes=_excludes(f"volume {pool}/{raw['project']}/{raw['name']}", wanted, reader, notes),
        reader=reader,
    )
    check_export_mode(item)
    return item


def _excludes(what: str, wanted: Policy, reader: str, notes: list[str]) -> list[str]:
    """The item's exclude patterns; none for an exported item (Incus's stream is stored
    whole), said in a note."""
    if reader == layout.EXPORT and wanted.excludes:
        notes.append(f"{what}: exclude patterns not applied: it is read as Incus's export stream")
        return []
    return wanted.excludes


def _located(
    volumes: list[dict[str, Any]], member: str | None, pool: str, elsewhere: list[str]
) -> list[dict[str, Any]]:
    """The volumes (and snapshots) on `member` (all when not clustered); the volumes on other
    members are named in `elsewhere`. Volumes of one name may lie on several members."""
    if member is None:
        return volumes
    here = [v for v in volumes if v.get("location") in (member, "")]
    elsewhere += [
        f"volume {pool}/{v['project']}/{v['name']} ({v['location']})"
        for v in volumes
        if v not in here and "/" not in v["name"]
    ]
    return here
