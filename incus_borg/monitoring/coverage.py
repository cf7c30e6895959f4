"""Whether every instance and custom volume on the server is backed up: the state of each,
from the live list of the server and the local index of runs.

- OK: every repository holds a run of it no older than its `max_age`;
- STALE: some repository's newest run of it is older than that, or it holds none;
- NEVER: it exists, and no run holds it;
- SKIPPED: the configuration (`instances:`) or its policy (`user.incus-borg.mode=skip`)
  leaves it out;
- FAILED: the last run that planned it left it out, with a warning.

A hook-mode run whose repositories are not known yet counts for every repository.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..config import Config, parse_duration
from ..errors import EXIT_OK, EXIT_WARNING
from ..incus import Incus, instances_using
from .index import Entry, Index, Run, ref

OK, STALE, NEVER, SKIPPED, FAILED = "OK", "STALE", "NEVER", "SKIPPED", "FAILED"
STATES = (OK, STALE, FAILED, NEVER, SKIPPED)
PROBLEMS = (STALE, FAILED, NEVER)
POLICY_KEY = "user.incus-borg.mode"  # `skip` leaves an instance or volume out
NOT_CLUSTERED = ("", "none")  # what Incus gives as `location` outside a cluster
Pair = tuple[Run, Entry]  # a run, and its record of one instance or volume


@dataclass(frozen=True)
class Live:
    """An instance or custom volume on the server now."""

    kind: str
    project: str
    name: str
    pool: str
    member: str
    skipped: str | None = None  # why the configuration or policy leaves it out

    @property
    def key(self) -> tuple[str, str]:
        """(kind, ref), as the index's entries."""
        return self.kind, ref(self.kind, self.project, self.name, self.pool)


@dataclass
class Standing:
    """The state of one instance or volume, and the runs behind it."""

    kind: str
    project: str
    name: str
    pool: str
    member: str
    state: str  # one of STATES; "" for what no longer exists
    reason: str = ""
    run: Run | None = None  # the newest run holding it
    repositories: list[str] = field(default_factory=list)  # those holding a run of it
    entry: Entry | None = None  # its record in `run`
    exists: bool = True

    @property
    def ref(self) -> str:
        """project/name, or pool/project/name for a volume."""
        return ref(self.kind, self.project, self.name, self.pool)

    def age(self, now: float) -> float | None:
        """Seconds since the newest run holding it."""
        return None if self.run is None else max(0.0, now - self.run.time)

    def figures(self) -> tuple[int | None, int | None]:
        """Bytes read and added by the newest run (the whole run's, in its first repository
        that reported them: Borg counts per archive, not per instance)."""
        if self.run is None:
            return None, None
        for stored in self.run.repositories.values():
            if stored.bytes_read is not None:
                return stored.bytes_read, stored.added
        return None, None

    def to_json(self, now: float) -> dict[str, Any]:
        """What `status --json` says of it."""
        read, added = self.figures()
        run = self.run
        return {
            "kind": self.kind,
            "project": self.project,
            "name": self.name,
            "pool": self.pool,
            "member": self.member,
            "state": self.state,
            "reason": self.reason,
            "run": run.run if run else None,
            "run_time": iso(run.time) if run else None,
            "age_seconds": self.age(now),
            "hook_mode": run.hook_mode if run else None,
            "repositories": self.repositories,
            "run_bytes_read": read,
            "run_deduplicated_bytes_added": added,
            "window": self.entry.window if self.entry else None,
            "changed_files": self.entry.changed_files if self.entry else None,
            "reader": self.entry.reader if self.entry else None,
        }


def iso(epoch: float) -> str:
    """Epoch seconds as local ISO 8601."""
    return datetime.fromtimestamp(epoch).astimezone().isoformat(timespec="seconds")


# --- the live server -------------------------------------------------------------------------


def live_items(incus: Incus, selection: list[str]) -> list[Live]:
    """Every instance (all projects) and custom volume on the server, each with why it is
    left out, if it is: one call for the instances, one for the pools, one per pool."""
    here = socket.gethostname()
    raw = incus.instances(recursion="1")
    chosen = {f"{i['project']}/{i['name']}" for i in raw if selected(i, selection)}
    items = [
        Live(
            "instance",
            i["project"],
            i["name"],
            _root_pool(i),
            _member(i, here),
            skip_reason(i, selection, f"{i['project']}/{i['name']}" in chosen),
        )
        for i in raw
    ]
    for pool in incus.pools():
        for vol in incus.custom_volumes(pool["name"]):
            if "/" in vol["name"]:  # a snapshot
                continue
            users = {f"{p}/{n}" for p, n in instances_using(vol.get("used_by") or [])}
            wanted = not selection or bool(users & chosen)
            items.append(
                Live(
                    "volume",
                    vol["project"],
                    vol["name"],
                    pool["name"],
                    _member(vol, here),
                    skip_reason(vol, selection, wanted, "only the volumes of the instances"),
                )
            )
    return sorted(items, key=lambda i: (i.kind, i.project, i.name, i.pool))


def _root_pool(raw: dict[str, Any]) -> str:
    return str((raw.get("expanded_devices") or {}).get("root", {}).get("pool", ""))


def _member(raw: dict[str, Any], here: str) -> str:
    location = str(raw.get("location") or "")
    return here if location in NOT_CLUSTERED else location


def selected(raw: dict[str, Any], selection: list[str]) -> bool:
    """Whether `instances:` (names or project/names; empty: all) picks this instance."""
    if not selection:
        return True
    return any(
        wanted.rpartition("/")[2] == raw["name"]
        and wanted.rpartition("/")[0] in ("", raw["project"])
        for wanted in selection
    )


def skip_reason(
    raw: dict[str, Any], selection: list[str], wanted: bool, what: str = "instances"
) -> str | None:
    """Why an instance or volume is left out of backups, or None."""
    config = raw.get("expanded_config") or raw.get("config") or {}
    if config.get(POLICY_KEY) == "skip":
        return f"{POLICY_KEY}=skip"
    if not wanted:
        return f"not among `instances:` ({what} listed there are backed up)"
    return None


# --- states ----------------------------------------------------------------------------------


def limits(config: Config, label: str | None) -> dict[str, float]:
    """max_age in seconds of each selected repository (its own, else the global one)."""
    return {
        repo.name: parse_duration(repo.max_age or config.max_age) or 0.0
        for repo in config.select_repositories(label)
    }


def history(index: Index, repositories: Iterable[str]) -> dict[tuple[str, str], list[Pair]]:
    """Per instance or volume, the (run, entry) pairs of the runs held in these
    repositories, oldest first."""
    wanted = list(repositories)
    found: dict[tuple[str, str], list[Pair]] = {}
    for run in index.ordered():
        if any(run.held_in(r) for r in wanted):
            for entry in run.items:
                found.setdefault(entry.key, []).append((run, entry))
    return found


def assess(live: list[Live], index: Index, ages: dict[str, float], now: float) -> list[Standing]:
    """The state of each live instance and volume, given each repository's max_age."""
    runs = history(index, ages)
    return [standing(item, runs.get(item.key, []), ages, now) for item in live]


def standing(item: Live, pairs: list[Pair], ages: dict[str, float], now: float) -> Standing:
    """The state of one instance or volume, from the runs that recorded it (oldest first)."""
    held = [(run, entry) for run, entry in pairs if entry.failed is None]
    result = Standing(item.kind, item.project, item.name, item.pool, item.member, OK)
    if held:
        result.run, result.entry = held[-1]
        result.repositories = holding(run for run, _ in held)
    last_run, last_entry = pairs[-1] if pairs else (None, None)
    if item.skipped:
        result.state, result.reason = SKIPPED, item.skipped
    elif last_run is not None and last_entry is not None and last_entry.failed:
        result.state, result.reason = FAILED, f"left out of {last_run.run}: {last_entry.failed}"
    elif result.run is None:
        result.state, result.reason = NEVER, "no run holds it"
    else:
        late = [why for repo, limit in ages.items() if (why := lateness(held, repo, limit, now))]
        if late:
            result.state, result.reason = STALE, "; ".join(late)
    return result


def holding(runs: Iterable[Run]) -> list[str]:
    """The repositories holding any of these runs ("hook" for a hook-mode run whose
    repositories are not known yet)."""
    names: set[str] = set()
    for run in runs:
        names |= set(run.repositories) if run.attributed else {"hook"}
    return sorted(names)


def lateness(held: list[Pair], repository: str, limit: float, now: float) -> str:
    """Why `repository` has no run of it young enough ("" when it has)."""
    times = [run.time for run, _ in held if run.held_in(repository)]
    if not times:
        return f"repository {repository} holds no run of it"
    age = now - max(times)
    if age > limit:
        return f"its newest run in {repository} is {age_text(age)} old (max_age {age_text(limit)})"
    return ""


def gone(live: list[Live], index: Index, repositories: Iterable[str]) -> list[Standing]:
    """What runs hold that is no longer on the server (a restore can bring it back)."""
    present = {item.key for item in live}
    found = []
    for key, pairs in sorted(history(index, repositories).items()):
        held = [(run, entry) for run, entry in pairs if entry.failed is None]
        if key in present or not held:
            continue
        run, entry = held[-1]
        result = Standing(entry.kind, entry.project, entry.name, entry.pool, run.member, "")
        result.run, result.entry, result.exists = run, entry, False
        result.repositories = holding(r for r, _ in held)
        found.append(result)
    return found


def counts(standings: Iterable[Standing]) -> dict[str, int]:
    """How many are in each state."""
    found = dict.fromkeys(STATES, 0)
    for s in standings:
        found[s.state] += 1
    return found


def exit_code(standings: Iterable[Standing]) -> int:
    """0 when everything is OK or SKIPPED, 1 when anything is STALE, NEVER or FAILED."""
    return EXIT_WARNING if any(s.state in PROBLEMS for s in standings) else EXIT_OK


def age_text(seconds: float) -> str:
    """A duration for people: 45s, 12m, 3h20m, 2d4h."""
    seconds = int(seconds)
    for unit, size, smaller, small_size in (
        ("d", 86400, "h", 3600),
        ("h", 3600, "m", 60),
        ("m", 60, "s", 1),
    ):
        if seconds >= size:
            rest = (seconds % size) // small_size
            return f"{seconds // size}{unit}" + (f"{rest}{smaller}" if rest else "")
    return f"{seconds}s"


def size_text(count: int | None) -> str:
    """A size for people: 12.3 MB ("-" when unknown)."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return "-"
