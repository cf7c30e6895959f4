"""One run's quiesce-and-stage work, shared by `backup` and `hook pre`: the server's own
state, and each instance or volume held (quiesced and mounted) while it is read."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .. import layout
from ..manifest import Item, Manifest
from .journal import Step
from .plan import Plan
from .session import Session

# Why a cluster member's run holds no copy of the database.
CLUSTER_DATABASE = (
    "a cluster's global database is a raft replica: one member's copy is not a valid "
    "database alone, and stopping a member disturbs the quorum of a small cluster"
)


@dataclass
class Held:
    """The quiesce steps holding one item, and since when."""

    item: Item
    steps: list[Step] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    quiesced: float = 0.0  # when the quiesce itself was in place (a snapshot exists)
    refs: list[str] = field(default_factory=list)  # instances frozen or stopped for it


class Capture:
    """Quiesces Incus and lays out the staging tree for one session."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.timings: dict[str, float] = {}
        self.daemon_downtime: float | None = None
        self.database_note = ""  # why the database is only in the SQL dumps, when it is
        # Instances this run froze or stopped: the step, and how many held items need it.
        self.held: dict[str, list[Any]] = {}

    # --- the server ------------------------------------------------------------------------

    def capture_server(self, plan: Plan) -> str:
        """Definitions, dumps, host files, the database and the Incus directory.

        Returns "exact" when the database was copied with the daemon stopped, else "dumps-only".
        """
        s = self.session
        started = time.monotonic()
        s.stage.prepare()
        s.stage.write_definitions(s.incus, clustered=s.member is not None)
        s.stage.write_dumps(s.incus)
        s.stage.copy_host_files(Path(s.config.incus.subuid), Path(s.config.incus.subgid))
        s.stage.write_plan_indexes(s.incus, plan, s.member)
        self.timings["metadata"] = time.monotonic() - started
        database = self._capture_database()
        s.quiescer.bind({s.stage.path(layout.INCUS): Path(s.config.incus.dir)})
        return database

    def _capture_database(self) -> str:
        s = self.session
        if s.member is not None:
            self.database_note = CLUSTER_DATABASE
            s.report(f"database: SQL dumps only, the daemon keeps running ({CLUSTER_DATABASE})")
            return "dumps-only"
        if not s.config.quiesce_daemon:
            self.database_note = "quiesce_daemon is false"
            s.warnings.add(
                "quiesce_daemon is false: only SQL dumps of the database are backed up, so "
                "`restore server` has no exact database"
            )
            return "dumps-only"
        started = time.monotonic()
        step = s.quiescer.stop_daemon()
        s.stage.copy_database(Path(s.config.incus.dir))
        s.quiescer.release(step)
        self.daemon_downtime = time.monotonic() - started
        s.report(f"database: copied with the daemon stopped for {self.daemon_downtime:.2f} s")
        return "exact"

    # --- instances and volumes -------------------------------------------------------------

    def hold(self, item: Item) -> Held:
        """Quiesce one item per its mode and bind-mount its data at stable paths; on a
        failure, what it took so far is released."""
        held = Held(item)
        try:
            self._quiesce(held)
            held.quiesced = time.monotonic()
            mounts = self._mounts(item).items()
            stage = self.session.stage
            held.steps += self.session.quiescer.bind({stage.path(r): src for r, src in mounts})
        except BaseException:
            self.release(held)
            raise
        return held

    def _quiesce(self, held: Held) -> None:
        item, q = held.item, self.session.quiescer
        snap = self.session.snapshot_name
        if item.mode == "snapshot" and item.kind == "instance":
            held.steps.append(q.snapshot_instance(item.project, item.name, snap))
        elif item.mode == "snapshot":
            volume = (item.pool, item.project, item.name)
            held.steps.append(q.snapshot_volume(*volume, snap, self.session.member))
        elif item.mode in ("freeze", "stop"):
            # A volume freezes (or stops) the running instances using it; an instance held
            # for two items at once is released when neither needs it any more.
            take = q.freeze if item.mode == "freeze" else q.stop
            for ref in [item.ref] if item.kind == "instance" else item.users:
                if ref not in self.held:
                    self.held[ref] = [take(*ref.split("/", 1)), 0]
                self.held[ref][1] += 1
                held.refs.append(ref)
        elif item.mode == "none":
            self.session.warnings.add(
                f"{item.kind} {item.ref} is read live: it may be inconsistent"
            )

    def release(self, held: Held) -> float:
        """Undo one item's mounts and quiesce; returns its quiesce window in seconds.

        The window is how long the instance could not run freely: from freeze (or stop) to
        its release; for a snapshot, the snapshot's creation; nothing when idle or live.
        """
        for step in reversed(held.steps):
            self.session.quiescer.release(step)
        held.steps.clear()
        for ref in held.refs:
            self.held[ref][1] -= 1
            if not self.held[ref][1]:
                self.session.quiescer.release(self.held.pop(ref)[0])
        held.refs.clear()
        mode = held.item.mode
        if mode in ("freeze", "stop"):
            return time.monotonic() - held.started
        return held.quiesced - held.started if mode == "snapshot" else 0.0

    def _mounts(self, item: Item) -> dict[PurePosixPath, Path]:
        incus_dir = Path(self.session.config.incus.dir)
        snap = self.session.snapshot_name if item.mode == "snapshot" else None
        args = (incus_dir, item.pool, item.project, item.name)
        if item.kind == "instance":
            source = (
                layout.instance_snapshot_data(*args, snap) if snap else layout.instance_data(*args)
            )
            return layout.instance_mounts(*args, item.snapshots, source)
        block = item.type == "block"
        source = (
            layout.volume_snapshot_data(*args, snap, block)
            if snap
            else layout.volume_data(*args, block)
        )
        return layout.volume_mounts(*args, item.snapshots, block, source)

    # --- the record ------------------------------------------------------------------------

    def manifest(self, plan: Plan, database: str, borg_version: str, hook_mode: bool) -> Manifest:
        """The manifest of this run, holding the plan's records as read."""
        s = self.session
        return Manifest(
            hostname=socket.gethostname(),
            run=s.run,
            created=s.created,
            incus_version=s.incus.version(),
            borg_version=borg_version,
            mode=s.mode,
            hook_mode=hook_mode,
            database=database,
            daemon_downtime=self.daemon_downtime,
            instances=plan.instances,
            volumes=plan.volumes,
            timings=self.timings,
            partial=plan.partial,
            member=s.member,
            database_note=self.database_note,
        )
