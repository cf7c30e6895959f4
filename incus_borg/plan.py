"""What a run will back up: instances and custom volumes, each with its quiesce mode."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .incus import Incus, api_path
from .layout import SNAPSHOT_PREFIX

# Drivers whose snapshots are atomic copy-on-write: `auto` snapshots instead of freezing.
ATOMIC_SNAPSHOT_DRIVERS = {"btrfs", "zfs", "lvm", "ceph"}
# Drivers whose volumes live as plain files under the Incus directory and can be read in place.
READABLE_DRIVERS = {"dir", "btrfs"}


@dataclass
class Target:
    """One instance or custom volume to back up."""

    kind: str  # "instance" or "volume"
    project: str
    name: str
    pool: str
    driver: str
    type: str  # "container", or "filesystem"/"block" for volumes
    status: str  # Running/Stopped/Frozen; for volumes ""
    snapshots: list[str]
    mode: str  # snapshot, freeze, stop, none, idle
    users: list[str] = field(default_factory=list)  # running instances using a volume

    @property
    def ref(self) -> str:
        """project/name."""
        return f"{self.project}/{self.name}"


@dataclass
class Plan:
    """Everything a run will read."""

    instances: list[Target]
    volumes: list[Target]
    pools: dict[str, str]  # name -> driver


def effective_mode(requested: str, driver: str, running: bool) -> str:
    """The quiesce mode for one target: `auto` resolved, nothing to do when not running."""
    if requested == "none":
        return "none"
    if not running:
        return "idle"
    if requested == "auto":
        return "snapshot" if driver in ATOMIC_SNAPSHOT_DRIVERS else "freeze"
    return requested


def user_snapshots(names: list[str]) -> list[str]:
    """Snapshots that are the admin's (not a leftover temporary one of ours)."""
    return [n for n in names if not n.startswith(SNAPSHOT_PREFIX)]


def build(incus: Incus, requested_mode: str, selection: list[str]) -> Plan:
    """Query Incus for every instance and custom volume, narrowed by `selection`."""
    pools = {
        p["name"]: p["driver"]
        for p in incus.query(api_path("/1.0/storage-pools", None, recursion="1"))
    }
    raw = incus.query(api_path("/1.0/instances", None, recursion="2", **{"all-projects": "true"}))
    chosen = _select(raw, selection)
    instances = [_instance_target(i, pools, requested_mode) for i in chosen]
    unreadable = [
        t.ref for t in instances if t.driver not in READABLE_DRIVERS or t.type != "container"
    ]
    if unreadable:
        raise UserError(
            f"cannot back up {', '.join(unreadable)}: only containers on dir and btrfs pools "
            "are read in place; exclude them with `instances:` and use `incus export`"
        )
    running = {f"{i['project']}/{i['name']}" for i in raw if i["status"] == "Running"}
    wanted = {t.ref for t in instances} if selection else None
    return Plan(instances, _volumes(incus, pools, requested_mode, running, wanted), pools)


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


def _instance_target(raw: dict[str, Any], pools: dict[str, str], requested: str) -> Target:
    pool = raw["expanded_devices"].get("root", {}).get("pool", "")
    driver = pools.get(pool, "")
    status = raw["status"]
    snapshots = user_snapshots([s["name"] for s in raw.get("snapshots") or []])
    return Target(
        "instance",
        raw["project"],
        raw["name"],
        pool,
        driver,
        raw["type"],
        status,
        snapshots,
        effective_mode(requested, driver, status == "Running"),
    )


def _volumes(
    incus: Incus,
    pools: dict[str, str],
    requested: str,
    running: set[str],
    wanted: set[str] | None,
) -> list[Target]:
    """Custom volumes: all, or (when instances were named) those the named instances use."""
    targets = []
    for pool, driver in sorted(pools.items()):
        path = api_path(f"/1.0/storage-pools/{pool}/volumes/custom", None, recursion="1")
        raw = incus.query(path + "&all-projects=true")
        snaps: dict[tuple[str, str], list[str]] = {}
        for vol in raw:
            parent, _, snap = vol["name"].partition("/")
            if snap:
                snaps.setdefault((vol["project"], parent), []).append(snap)
        for vol in raw:
            users = _users(vol)
            if "/" in vol["name"] or (wanted is not None and not wanted & set(users)):
                continue
            if driver not in READABLE_DRIVERS:
                raise UserError(
                    f"cannot back up volume {pool}/{vol['name']}: only dir and btrfs pools "
                    "are read in place"
                )
            users = [u for u in users if u in running]
            targets.append(
                Target(
                    "volume",
                    vol["project"],
                    vol["name"],
                    pool,
                    driver,
                    vol["content_type"],
                    "",
                    user_snapshots(snaps.get((vol["project"], vol["name"]), [])),
                    effective_mode(requested, driver, bool(users)),
                    users,
                )
            )
    return sorted(targets, key=lambda t: (t.pool, t.project, t.name))


def _users(vol: dict[str, Any]) -> list[str]:
    """The instances (project/name) that use a volume."""
    users = []
    for url in vol.get("used_by") or []:
        if not url.startswith("/1.0/instances/"):
            continue
        name, _, query = url.removeprefix("/1.0/instances/").partition("?")
        project = query.removeprefix("project=") if query.startswith("project=") else "default"
        users.append(f"{project}/{name}")
    return users
