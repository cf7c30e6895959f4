"""One run's quiesce-and-stage work, shared by `backup` and `hook pre`/`hook post`."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath

from . import layout
from .config import Config
from .errors import UserError, Warnings
from .incus import Incus
from .journal import Journal, Step
from .manifest import Item, Manifest
from .plan import Plan, Target
from .quiesce import Quiescer
from .stage import Stage

Report = Callable[[str], None]


@dataclass
class Held:
    """The quiesce steps holding one target, and since when."""

    target: Target
    steps: list[Step] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    quiesced: float = 0.0  # when the quiesce itself was in place (a snapshot exists)
    refs: list[str] = field(default_factory=list)  # instances frozen or stopped for it


class Capture:
    """Quiesces Incus and lays out the staging tree for one run."""

    def __init__(
        self, config: Config, mode: str, incus: Incus, warnings: Warnings, report: Report
    ) -> None:
        self.config = config
        self.mode = mode
        self.incus = incus
        self.warnings = warnings
        self.report = report
        self.journal = Journal(Path(config.staging_dir))
        self.quiescer = Quiescer(incus, config.incus, self.journal)
        self.stage = Stage(Path(config.staging_dir))
        now = datetime.now()
        self.created = now.astimezone().isoformat(timespec="seconds")
        self.snapshot_name = layout.SNAPSHOT_PREFIX + now.strftime("%Y%m%d%H%M%S")
        self.run = config.archive_name_format.format(hostname=socket.gethostname(), now=now)
        self.timings: dict[str, float] = {}
        self.daemon_downtime: float | None = None
        self.held: set[str] = set()  # instances this run has frozen or stopped

    # --- before and after ------------------------------------------------------------------

    def recover(self, command: str) -> None:
        """Undo what an earlier run left quiesced, unless a hook-mode run is still under way."""
        data = self.journal.read()
        if data is None:
            return
        if data.get("kind") == "hook" and command == "backup":
            raise UserError(
                f"a hook-mode backup ({data.get('run')}) is under way: `incus-borg hook pre` ran "
                "and `incus-borg hook post` did not; if nothing is reading the staging tree, "
                "run `incus-borg hook post`"
            )
        if data.get("steps"):
            if command != "hook post":
                self.warnings.add(
                    f"an earlier run ({data.get('run')}) left {len(data['steps'])} step(s) "
                    "to undo: undoing them first"
                )
            if not self.quiescer.undo_all(self.warnings):
                raise UserError(f"could not undo what an earlier run left: see {self.journal.path}")
        self.journal.clear()
        self.stage.cleanup()

    def finish(self) -> bool:
        """Undo every quiesce and mount of this run, then empty staging."""
        clean = self.quiescer.undo_all(self.warnings)
        if clean:
            self.stage.cleanup()
        return clean

    # --- the server ------------------------------------------------------------------------

    def capture_server(self, plan: Plan) -> str:
        """Definitions, dumps, host files, the database and the Incus directory.

        Returns "exact" when the database was copied with the daemon stopped, else "dumps-only".
        """
        started = time.monotonic()
        self.stage.prepare()
        self.stage.write_definitions(self.incus)
        self.stage.write_dumps(self.incus)
        self.stage.copy_host_files(Path(self.config.incus.subuid), Path(self.config.incus.subgid))
        self.stage.write_plan_indexes(self.incus, plan)
        self.timings["metadata"] = time.monotonic() - started
        database = self._capture_database()
        self.quiescer.bind(Path(self.config.incus.dir), self.stage.path(layout.INCUS))
        return database

    def _capture_database(self) -> str:
        if not self.config.quiesce_daemon:
            self.warnings.add(
                "quiesce_daemon is false: only SQL dumps of the database are backed up, so "
                "`restore server` has no exact database"
            )
            return "dumps-only"
        started = time.monotonic()
        step = self.quiescer.stop_daemon()
        self.stage.copy_database(Path(self.config.incus.dir))
        self.quiescer.release(step)
        self.daemon_downtime = time.monotonic() - started
        self.report(f"database: copied with the daemon stopped for {self.daemon_downtime:.2f} s")
        return "exact"

    # --- instances and volumes -------------------------------------------------------------

    def hold(self, target: Target) -> Held:
        """Quiesce one target per its mode and bind-mount its data at stable paths."""
        held = Held(target)
        q = self.quiescer
        if target.mode == "snapshot":
            if target.kind == "instance":
                held.steps.append(
                    q.snapshot_instance(target.project, target.name, self.snapshot_name)
                )
            else:
                held.steps.append(
                    q.snapshot_volume(target.pool, target.project, target.name, self.snapshot_name)
                )
        elif target.mode in ("freeze", "stop"):
            take = q.freeze if target.mode == "freeze" else q.stop
            refs = [target.ref] if target.kind == "instance" else target.users
            for ref in refs:
                if ref in self.held:  # a volume's user that this run already holds
                    continue
                project, name = ref.split("/", 1)
                held.steps.append(take(project, name))
                held.refs.append(ref)
                self.held.add(ref)
        elif target.mode == "none":
            self.warnings.add(f"{target.kind} {target.ref} is read live: it may be inconsistent")
        held.quiesced = time.monotonic()
        for relative, source in self._mounts(target).items():
            held.steps.append(q.bind(source, self.stage.path(relative)))
        return held

    def release(self, held: Held) -> float:
        """Undo one target's quiesce and mounts; returns its quiesce window in seconds.

        The window is how long the instance could not run freely: from freeze (or stop) to
        its release; for a snapshot, the snapshot's creation; nothing when idle or live.
        """
        for step in reversed(held.steps):
            self.quiescer.release(step)
        self.held -= set(held.refs)
        mode = held.target.mode
        if mode in ("freeze", "stop"):
            return time.monotonic() - held.started
        return held.quiesced - held.started if mode == "snapshot" else 0.0

    def _mounts(self, target: Target) -> dict[PurePosixPath, Path]:
        incus_dir = Path(self.config.incus.dir)
        snap = self.snapshot_name if target.mode == "snapshot" else None
        args = (incus_dir, target.pool, target.project, target.name)
        if target.kind == "instance":
            source = (
                layout.instance_snapshot_data(*args, snap) if snap else layout.instance_data(*args)
            )
            return layout.instance_mounts(*args, target.snapshots, source)
        block = target.type == "block"
        source = (
            layout.volume_snapshot_data(*args, snap, block)
            if snap
            else layout.volume_data(*args, block)
        )
        return layout.volume_mounts(*args, target.snapshots, block, source)

    # --- the record ------------------------------------------------------------------------

    def manifest(
        self,
        plan: Plan,
        database: str,
        items: dict[str, Item],
        borg_version: str,
        hook_mode: bool,
    ) -> Manifest:
        """The manifest of this run; `items` maps a target's archive path to its record."""
        version = str(self.incus.query("/1.0")["environment"].get("server_version", ""))
        return Manifest(
            hostname=socket.gethostname(),
            run=self.run,
            created=self.created,
            incus_version=version,
            borg_version=borg_version,
            mode=self.mode,
            hook_mode=hook_mode,
            database=database,
            daemon_downtime=self.daemon_downtime,
            instances=[items[archive_path(t)] for t in plan.instances],
            volumes=[items[archive_path(t)] for t in plan.volumes],
            timings=self.timings,
        )


def archive_path(target: Target) -> str:
    """A target's subtree in staging and in the archive."""
    if target.kind == "instance":
        return str(layout.instance_stage(target.project, target.name))
    return str(layout.volume_stage(target.pool, target.project, target.name))


def item_for(target: Target) -> Item:
    """A manifest record for a target, before it is read."""
    return Item(
        kind=target.kind,
        project=target.project,
        name=target.name,
        pool=target.pool,
        driver=target.driver,
        type=target.type,
        snapshots=target.snapshots,
        state=target.status,
        mode=target.mode,
        path=archive_path(target),
    )
