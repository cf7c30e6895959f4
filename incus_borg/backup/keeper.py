"""The gate keeper that `hook pre` leaves behind, so that another program's Borg (borgmatic's)
finds each instance quiesced only while it reads it.

`hook pre` mounts every item's live data at its stable paths, then forks this keeper, which
owns a gate (gate.py) on the items' staging directories. When a process opens one, the
keeper quiesces that item (freezes or stops it, or mounts a fresh snapshot over its live
data), lets the open through, and releases the item once that process has closed the
directory (Borg keeps a directory open until it has read everything below it), or is gone.
A consistency group's members are quiesced together when a Borg opens the first of them,
and released once it has closed every one (see groups.py). So each Borg pass (borgmatic runs one per repository) gets its own
windows, and nothing is held between passes or by a Borg that reads no staging directory. A
`borg create --dry-run` (borgmatic's check of the paths it plans to read) reads no data: it
goes through without a quiesce.

Bounds: a freeze or stop that lasts `max_window` is released (that read is then not
consistent, and `hook post` says so); the keeper ends by itself after its lifetime, or once
the process that ran `hook pre` is gone, releasing everything it holds. If it is killed, the
kernel lets every pending open through: Borg reads the live data, and `hook post` reports the
run as not consistent. Every quiesce is journalled, so whatever undoes the run (`hook post`,
or the next run) undoes what a dead keeper left.

The keeper writes what it did as JSON lines in a file beside the journal (see `Record`).
"""

from __future__ import annotations

import json
import os
import select
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import UserError
from ..host import processes, testpoints
from ..manifest import Group, Item
from . import groups
from .capture import Capture, Held
from .gate import Gate, Opening
from .reader import WINDOW_MODES

TICK = 0.05  # seconds between checks of the bounds while nothing is opened
READY_WAIT = 30.0  # seconds `hook pre` waits for the keeper to have its gate in place
# Programs that run a command and wait for it: the shells of a hook script or `sh -c`, and
# the wrappers an admin puts before `hook pre` (they fork, so they stand between).
WRAPPERS = ("sh", "dash", "bash", "sudo", "su", "runuser", "timeout", "flock", "nohup")
GATED_MODES = (*WINDOW_MODES, "snapshot")  # the modes a keeper quiesces just in time


def record_path(staging_dir: Path) -> Path:
    """The keeper's record, beside the staging directory."""
    return staging_dir.with_name(staging_dir.name + ".keeper")


class Record:
    """What the keeper did, one JSON object per line: `start`, `enter` (an item quiesced
    for a reader), `window` (it was released), `failed` (it could not be quiesced), `stuck`
    (it could not be released), `ask` (`hook post` asks it to end), `end` (why it ended)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def clear(self) -> None:
        """Begin an empty record, readable by root only."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)

    def write(self, entry: str, **fields: Any) -> None:
        """Append one line: {entry: fields} (a record made again is root's only, too)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps({entry: fields}) + "\n")

    def keepers(self) -> list[dict[str, Any]]:
        """The keeper that wrote the record, as a journal step that ends it."""
        return [
            {"op": "end_keeper", "pid": fields["pid"], "started": fields.get("started")}
            for kind, fields in self.read()
            if kind == "start"
        ]

    def read(self) -> list[tuple[str, dict[str, Any]]]:
        """Every complete line, as (kind, fields); nothing when there is no record."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        parsed = []
        for line in lines:
            try:
                ((kind, fields),) = json.loads(line).items()
            except (ValueError, AttributeError):
                continue  # a line torn by a kill, or not one of a record
            parsed.append((kind, fields))
        return parsed


@dataclass
class Hold:
    """What the keeper quiesced for its readers: one item, or a consistency group's members
    (at one moment: they are released together)."""

    helds: list[Held]
    readers: set[int]  # those reading them now
    pids: set[int] = field(default_factory=set)  # every one that read them in this window
    allowed: float = field(default_factory=time.monotonic)  # when their first read began

    @property
    def started(self) -> float:
        return min(h.started for h in self.helds)


@dataclass
class Reader:
    """A process that opened a gated directory: a Borg holds the item it walks (and the
    group it is in until it has read every member); any other program (restic, tar) may
    read files in any order, so it holds every item until it is gone."""

    started: int | None
    borg: bool
    units: set[int] = field(default_factory=set)  # the holds it is in (by their first index)
    unread: dict[int, set[int]] = field(default_factory=dict)  # per hold: members not read


@dataclass
class Keeper:
    """Quiesces each gated item while a reader walks its staging directory."""

    capture: Capture
    items: list[Item]  # the gated ones
    stage_root: Path
    record: Record
    max_window: float
    lifetime: float
    starter: tuple[int, int | None]  # the process that ran `hook pre`, and its start time
    groups: list[Group] = field(default_factory=list)  # the run's consistency groups
    holds: dict[int, Hold] = field(default_factory=dict)  # by its first item's index
    readers: dict[int, Reader] = field(default_factory=dict)  # by pid
    ending: str | None = None

    def __post_init__(self) -> None:
        paths = [os.path.realpath(self.stage_root / item.path) for item in self.items]
        self.paths = {path: k for k, path in enumerate(paths)}
        by_name = {g.name: g for g in self.groups}
        self._group = {k: by_name[i.group] for k, i in enumerate(self.items) if i.group}
        self._members: dict[int, list[int]] = {}  # item -> the items held with it
        for k in range(len(self.items)):
            group = self._group.get(k)
            self._members[k] = [j for j in self._group if self._group[j] is group] or [k]

    def unit(self, k: int) -> int:
        """The hold item `k` is in: its own, or its group's (by its first member)."""
        return self._members[k][0]

    def mark(self, gate: Gate) -> None:
        """Put every gated item's directory behind the gate."""
        for path in self.paths:
            gate.mark(Path(path), closes=True)

    def run(self, gate: Gate) -> None:
        """Keep the gate until asked to end (SIGTERM), or a bound ends it; then release
        everything and close the gate."""
        deadline = time.monotonic() + self.lifetime
        with self._asked_to_end():
            try:
                while self.ending is None:
                    for event in gate.wait(TICK):
                        self._on(gate, event)
                    self._check(deadline)
            finally:
                gate.close()
                for u in list(self.holds):
                    self._release(u, "released as the keeper ended")
        self.record.write("end", why=self.ending, asked=self.ending == ASKED)

    @contextmanager
    def _asked_to_end(self) -> Iterator[None]:
        def ask(signum: int, frame: FrameType | None) -> None:
            self.ending = self.ending or ASKED

        previous = {s: signal.signal(s, ask) for s in (signal.SIGTERM, signal.SIGINT)}
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    # --- the gate --------------------------------------------------------------------------

    def _on(self, gate: Gate, event: Opening) -> None:
        k = self.paths.get(event.path)
        reader = self.readers.get(event.pid)
        if event.closed:
            gate.drop(event)
            if k is not None and reader is not None and reader.borg:
                self._read(event.pid, k)
            return
        try:
            if k is not None:
                self._enter(event.pid, k)
        finally:
            gate.allow(event)

    def _enter(self, pid: int, k: int) -> None:
        """Quiesce item k (with its group) for reader `pid` (a Borg: once what it read before
        is released, but a group it has not read whole), or every item for a reader that is
        not Borg."""
        reader = self.readers.get(pid)
        if reader is None:
            argv = processes.cmdline(pid)
            if is_borg(argv) and ("--dry-run" in argv or "-n" in argv):
                return  # reads no data
            reader = self.readers[pid] = Reader(processes.start_time(pid), is_borg(argv))
            if not reader.borg:
                name = os.path.basename(argv[0]) if argv else "?"
                self.record.write("other", pid=pid, program=name)
        if reader.borg:
            wanted = {self.unit(k)} | {u for u in reader.units if reader.unread.get(u)}
        else:
            wanted = {self.unit(j) for j in range(len(self.items))}
        for u in reader.units - wanted:
            self._leave(pid, u)
        for u in sorted(wanted - reader.units):
            reader.units.add(u)
            reader.unread[u] = set(self._members[u])
            self._hold(pid, u)

    def _read(self, pid: int, k: int) -> None:
        """Borg `pid` closed item k's directory: it read it. Once it has read the whole hold
        it is in, that is released unless another reads it."""
        reader, u = self.readers[pid], self.unit(k)
        if u not in reader.units:
            return
        reader.unread[u].discard(k)
        if not reader.unread[u]:
            self._leave(pid, u)

    def _hold(self, pid: int, u: int) -> None:
        if u in self.holds:
            self.holds[u].readers.add(pid)
            self.holds[u].pids.add(pid)
            return
        items = [self.items[j] for j in self._members[u]]
        try:
            helds = self._quiesce(u, items)
        except (UserError, OSError) as exc:  # read live: the run is not consistent for them
            for item in items:
                self.record.write("failed", ref=item.ref, kind=item.kind, pid=pid, why=str(exc))
            return
        self.holds[u] = Hold(helds, {pid}, {pid})
        for item in items:
            self.record.write("enter", ref=item.ref, kind=item.kind, pid=pid)
        testpoints.reached("held", items[0].ref)

    def _quiesce(self, u: int, items: list[Item]) -> list[Held]:
        """Quiesce one item, or a group's members at one moment, over their live data."""
        group = self._group.get(u)
        if group is None:
            return [self.capture.hold_mounted(items[0])]
        if group.mode != "snapshot":
            return self.capture.hold_group(items, group, mounted=True)
        helds = self.capture.take_group_snapshots(items, group)
        try:
            for held in helds:
                self.capture.stack_snapshot(held)
        except BaseException:
            for held in helds:
                self.capture.release(held)
            raise
        return helds

    def _leave(self, pid: int, u: int) -> None:
        """Reader `pid` is done with hold `u`: release it unless another reads it."""
        reader = self.readers[pid]
        reader.units.discard(u)
        reader.unread.pop(u, None)
        hold = self.holds.get(u)
        if hold is not None:
            hold.readers.discard(pid)
            if not hold.readers:
                self._release(u)

    def _release(self, u: int, note: str = "") -> None:
        hold = self.holds.pop(u)
        now, group = time.monotonic(), self._group.get(u)
        try:
            if group is not None and group.mode != "snapshot":
                windows = self.capture.release_group(hold.helds, group)
            else:
                windows = [self.capture.release(held) for held in hold.helds]
        except Exception as exc:  # still journalled: `hook post` undoes it
            for held in hold.helds:
                self.record.write("stuck", why=str(exc), **self._fields(held, hold, now, note))
            return
        for held, window in zip(hold.helds, windows, strict=True):
            fields = self._fields(held, hold, now, note) | {"release": time.monotonic() - now}
            self.record.write("window", length=window, **fields)
        if group is not None:
            members = [h.item.ref for h in hold.helds if h.item.kind == "instance"]
            self.record.write(
                "group", name=group.name, members=members, mode=group.mode, at=group.at,
                window=group.window,
            )  # fmt: skip

    @staticmethod
    def _fields(held: Held, hold: Hold, now: float, note: str) -> dict[str, Any]:
        item = held.item
        fields: dict[str, Any] = {"ref": item.ref, "kind": item.kind, "mode": item.mode}
        fields |= {"pids": sorted(hold.pids), "read": now - hold.allowed, "note": note}
        fields["quiesce"] = hold.allowed - held.started  # how long taking it took
        return fields

    # --- the bounds ------------------------------------------------------------------------

    def _check(self, deadline: float) -> None:
        for pid, reader in list(self.readers.items()):
            if not processes.running(pid, reader.started):
                for u in list(reader.units):
                    self._leave(pid, u)
                del self.readers[pid]
        now = time.monotonic()
        for u, hold in list(self.holds.items()):
            mode = self._group[u].mode if u in self._group else self.items[u].mode
            if mode in WINDOW_MODES and now - hold.started > self.max_window:
                self._release(u, TOO_LONG.format(self.max_window))
        if now > deadline:
            self.ending = self.ending or f"it reached its lifetime ({self.lifetime:.0f} s)"
        if not processes.running(*self.starter):
            self.ending = self.ending or (
                f"the process that ran `hook pre` (pid {self.starter[0]}) is gone"
            )


ASKED = "asked to end"
TOO_LONG = "released after max_window ({:.0f} s) while Borg still read it: not consistent"


def is_borg(argv: list[str]) -> bool:
    """Whether a command line runs Borg (directly, or its script through Python)."""
    return any(os.path.basename(arg) == "borg" for arg in argv[:2])


def starter() -> tuple[int, int | None]:
    """The process that ran this one, through the shells (a hook script, `sh -c`) and the
    wrappers (`sudo`, `timeout`, `flock`, ...) between them: borgmatic, or the admin's
    shell."""
    pid = os.getppid()
    while pid > 1:
        argv = processes.cmdline(pid)
        if not argv or os.path.basename(argv[0]).lstrip("-") not in WRAPPERS or len(argv) < 2:
            break
        pid = processes.parent(pid)
    return pid, processes.start_time(pid)


def leave(keeper: Keeper, keep_fds: tuple[int, ...]) -> int:
    """Fork the keeper into its own session, detached from the caller's terminal and pipes
    (borgmatic waits for a hook's output to end), and return its pid once its gate is in
    place. A keeper that cannot start is ended, and its error raised."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the keeper: never returns
        os.close(ready_r)
        _keep(keeper, ready_w, keep_fds)
    os.close(ready_w)
    try:
        answer = _read_ready(ready_r)
    except BaseException:  # interrupted before the keeper was journalled: it must not stay
        processes.end(pid, processes.start_time(pid))
        raise
    finally:
        os.close(ready_r)
    if answer != "ready":
        processes.end(pid, processes.start_time(pid))
        raise UserError(f"the gate keeper could not start: {answer}")
    return pid


def _read_ready(fd: int) -> str:
    deadline = time.monotonic() + READY_WAIT
    chunks = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    text = b"".join(chunks).decode(errors="replace")
    return text or f"it gave no sign within {READY_WAIT:.0f} s"


def _keep(keeper: Keeper, ready: int, keep_fds: tuple[int, ...]) -> None:
    """The keeper process: detach, take the gate, say so on `ready`, keep it, exit."""
    code = 0
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        keep = sorted({ready, *keep_fds})
        start = 3
        for fd in keep:
            os.closerange(start, fd)
            start = fd + 1
        os.closerange(start, os.sysconf("SC_OPEN_MAX"))
        session = keeper.capture.session
        session.journal.claim_lock()
        session.quiescer.watch_keeper(os.getpid())
        with Gate() as gate:
            keeper.mark(gate)
            refs = [{"ref": i.ref, "kind": i.kind, "mode": i.mode} for i in keeper.items]
            pid, started = os.getpid(), processes.start_time(os.getpid())
            keeper.record.write(
                "start", pid=pid, started=started, items=refs, lifetime=keeper.lifetime
            )
            os.write(ready, b"ready")
            os.close(ready)
            ready = -1
            keeper.run(gate)
    except BaseException as exc:
        code = 1
        why = str(exc) if isinstance(exc, UserError) else traceback.format_exc()
        if ready >= 0:
            os.write(ready, why.encode())
        keeper.record.write("end", why=f"it failed: {why}", asked=False)
    finally:
        os._exit(code)


# --- what `hook post` says -----------------------------------------------------------------

DID = {"freeze": "frozen", "stop": "stopped", "snapshot": "snapshotted"}
Windows = dict[str, list[float]]  # item ref -> its windows, in seconds


def report(record: Record, say: Callable[[str], None], warn: Callable[[str], None]) -> Windows:
    """Say what the keeper did, per item: its windows and their lengths; warn (the run is not
    consistent) about every read it did not quiesce. Returns the windows per item ref."""
    lines = record.read()
    starts = [fields for kind, fields in lines if kind == "start"]
    if not starts:
        return {}
    items = starts[0]["items"]
    windows: Windows = {item["ref"]: [] for item in items}
    covered: dict[int, set[str]] = {}  # reader pid -> the items it read quiesced
    entered: dict[str, int] = {}  # item -> the reader it is held for, until released
    last = None  # the reader that came to the gate last
    parts: dict[str, list[str]] = {}  # each window in words
    for kind, fields in lines:
        ref = fields.get("ref", "")
        if kind in ("enter", "failed") and "pid" in fields:
            last = fields["pid"]
        if kind == "enter":
            entered[ref] = fields["pid"]
        elif kind == "window":
            windows[ref].append(fields["length"])
            took = f"Incus {fields.get('quiesce', 0.0):.2f} s to quiesce"
            said = f"{fields['length']:.2f} s ({took}, Borg {fields['read']:.2f} s to read)"
            parts.setdefault(ref, []).append(said)
            entered.pop(ref, None)
            for pid in fields["pids"]:
                covered.setdefault(pid, set()).add(ref)
            if fields["note"]:
                warn(f"{fields['kind']} {ref}: {fields['note']}")
        elif kind == "group":
            say(groups.done(Group(**fields)))
        elif kind == "other":
            say(
                f"{fields['program']} (pid {fields['pid']}) is not Borg, and may read files in "
                "any order: every instance was held from its first read until it ended"
            )
        elif kind == "failed":
            entered.pop(ref, None)
            warn(f"{fields['kind']} {ref} read without a quiesce: {fields['why']}")
        elif kind == "stuck":  # read quiesced, then not released
            entered.pop(ref, None)
            for pid in fields["pids"]:
                covered.setdefault(pid, set()).add(ref)
            warn(
                f"{fields['kind']} {ref} stayed quiesced after Borg read it, until `hook post` "
                f"undid it: could not release it: {fields['why']}"
            )
    for item in items:
        done = windows[item["ref"]]
        said = ", ".join(parts.get(item["ref"], []))
        what = f"{DID[item['mode']]} {len(done)} time(s) while Borg read it: {said}"
        say(f"{item['kind']} {item['ref']}: " + (what if done else "not read by Borg"))
    ends = [(at, fields) for at, (kind, fields) in enumerate(lines) if kind == "end"]
    asks = [at for at, (kind, _) in enumerate(lines) if kind == "ask"]
    if not ends:
        warn(_killed(items, covered.get(last, set()) if last else None, entered))
    elif not ends[-1][1]["asked"] or not any(at < ends[-1][0] for at in asks):
        why = ends[-1][1]["why"] if not ends[-1][1]["asked"] else "a signal not from `hook post`"
        warn(
            f"the gate keeper ended by itself: {why}; whatever Borg read after that was not "
            "quiesced, so this run is not consistent"
        )
    return windows


def group_windows(record: Record) -> dict[str, tuple[str | None, float | None]]:
    """Each group's last moment and window, as the keeper recorded them."""
    return {
        fields["name"]: (fields.get("at"), fields.get("window"))
        for kind, fields in record.read()
        if kind == "group"
    }


def _killed(items: list[dict[str, Any]], read: set[str] | None, held: dict[str, int]) -> str:
    """Why a run whose keeper was killed is not consistent, naming the instances: those the
    Borg under way (`read`: what it read quiesced) had not read, or all when it had read
    them all (a later pass read them live) or no Borg came at all."""
    refs = [item["ref"] for item in items]
    live = [ref for ref in refs if read is not None and ref not in read and ref not in held]
    kept = f"; {', '.join(held)} stayed quiesced until `hook post`" if held else ""
    return (
        f"the gate keeper was killed: Borg may have read {', '.join(live or refs)} without a "
        f"quiesce, so this run is not consistent for them{kept}"
    )
