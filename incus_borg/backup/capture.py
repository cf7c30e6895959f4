"""One run's quiesce-and-stage work, shared by `backup` and `hook pre`: the instances' pre
commands, the server's own state, and each instance or volume held (quiesced and mounted)
while it is read, then released (and its post command run)."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from .. import __version__, layout, profile
from ..host import testpoints
from ..host.parallel import side_by_side
from ..manifest import Group, Item, Manifest
from . import commands, groups
from .commands import Outcome
from .journal import Step
from .plan import Plan
from .session import Session

# Why a cluster member's run holds no copy of the database.
CLUSTER_DATABASE = (
    "a cluster's global database is a raft replica: one member's copy is not a valid "
    "database alone, and stopping a member disturbs the quorum of a small cluster"
)


# Drivers whose snapshot of a running container takes no freeze of its own: a snapshot
# group's members on them are frozen through the kernel (Quiescer.freeze_briefly). On `dir`,
# Incus's snapshot freezes and thaws the container through liblxc, which would end a freeze
# liblxc does not know of: there the group is frozen through Incus.
BRIEF_FREEZE = {"btrfs"}


@dataclass
class Held:
    """What holds one item (its temporary snapshot, its mounts, the instances frozen or
    stopped for it), and since when."""

    item: Item
    snapshot: Step | None = None
    mounts: list[Step] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)  # instances frozen or stopped for it
    started: float = field(default_factory=time.monotonic)
    quiesced: float = 0.0  # when the quiesce itself was in place (a snapshot exists)


class Capture:
    """Quiesces Incus and lays out the staging tree for one session."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.timings: dict[str, float] = {}
        self.daemon_downtime: float | None = None
        self.database_note = ""  # why the database is only in the SQL dumps, when it is
        # Instances this run froze or stopped: the step, and how many held items need it.
        self.held: dict[str, list[Any]] = {}
        # Instances whose pre ran (or that have a post), by item path: the step that ends
        # their commands and runs their post.
        self.guards: dict[str, Step] = {}
        self.post_on_release = False  # run an instance's post as soon as it is released
        # The import files of the instances read in place, as Borg reads them (for the run
        # catalogue, see runs/catalogue.py); None: not kept.
        self.import_files: dict[str, bytes] | None = None

    # --- pre commands ----------------------------------------------------------------------

    def run_pres(self, plan: Plan) -> None:
        """Say what the policy skips, and run every planned instance's pre command, before
        anything is quiesced. An instance whose pre fails (or times out) is left out of the
        run, with a warning, once its post ran; the run is then partial. Stopped instances run
        none: they are read as they are."""
        with profile.phase("pre commands"):
            self._run_pres(plan)

    def _run_pres(self, plan: Plan) -> None:
        s = self.session
        for note in plan.notes:
            s.report(note)
        for item in plan.skipped:
            s.report(f"{item.kind} {item.ref}: skipped (mode skip from {item.mode_source})")
        for item in plan.instances:
            if not (item.pre or item.post):
                continue
            if item.state != "Running":
                s.report(
                    f"instance {item.ref} is {item.state.lower()}: its pre and post commands "
                    "are not run; it is read as it is"
                )
                continue
            assert item.timeout is not None
            step = s.quiescer.guard(item.project, item.name, item.post, item.timeout)
            if item.pre and not self._pre(item, step):
                _record_post(item, s.quiescer.release(step))
                plan.partial = True
                continue
            self.guards[item.path] = step

    def _pre(self, item: Item, step: Step) -> bool:
        """Run one instance's pre command; whether it succeeded (else the item is failed)."""
        s = self.session
        assert item.pre is not None and item.timeout is not None
        outcome = commands.run(
            s.incus, item.project, item.name, item.pre, item.timeout, step["token"]
        )
        item.pre_exit, item.pre_duration = outcome.exit_code, outcome.duration
        if outcome.ok:
            s.report(f"instance {item.ref}: pre command ran in {outcome.duration:.1f} s")
            return True
        item.failed = f"its pre command {outcome.problem}"
        s.warnings.add(
            f"instance {item.ref} left out of this run: its pre command {outcome.failure()}"
        )
        return False

    def _post_soon(self, item: Item) -> None:
        """Run an instance's post command in the background (the session waits for it)."""
        step = self.guards.pop(item.path, None)
        if step is not None:
            self.session.quiescer.release_later(step, lambda done: _record_post(item, done))

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """Add the time the block takes to the run's timing of `what`."""
        started = time.monotonic()
        try:
            with profile.phase(what):
                yield
        finally:
            self.timings[what] = self.timings.get(what, 0.0) + time.monotonic() - started

    # --- the server ------------------------------------------------------------------------

    def capture_server(self, plan: Plan) -> str:
        """The server's metadata, then its state (see `capture_state`)."""
        self.capture_metadata(plan)
        return self.capture_state(whole=False)

    def capture_metadata(self, plan: Plan) -> None:
        """Definitions, dumps, host files and import indexes (nothing quiesced)."""
        s = self.session
        with self.timed("metadata"):
            s.stage.prepare()
            with profile.phase("definitions"):
                s.stage.write_definitions(s.incus, clustered=s.member is not None)
            with profile.phase("sql dumps"):
                s.stage.write_dumps(s.incus)
            s.stage.copy_host_files(Path(s.config.incus.subuid), Path(s.config.incus.subgid))
            with profile.phase("import indexes"):
                s.stage.write_plan_indexes(s.incus, plan, s.member)

    def capture_state(self, whole: bool = True) -> str:
        """The database and the Incus directory: mounted `whole` (incus-borg's own Borg is
        given INCUS_EXCLUDES), or without what they exclude (hook mode: another program's
        Borg is given none). Returns "exact" when the database was copied with the daemon
        stopped, else "dumps-only"."""
        s = self.session
        database = self._capture_database()
        incus_dir = Path(s.config.incus.dir)
        if whole:
            s.quiescer.bind({s.stage.path(layout.INCUS): incus_dir})
            return database
        view = layout.incus_view(incus_dir)
        s.stage.make_view(view)
        s.quiescer.bind({s.stage.path(r): source for r, source in view.bound.items()})
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
        with profile.phase("daemon down"):
            with profile.phase("daemon stop"):
                step = s.quiescer.stop_daemon()
            testpoints.reached("daemon-stopped")
            with profile.phase("database copy"):
                s.stage.copy_database(Path(s.config.incus.dir))
            with profile.phase("daemon start"):
                s.quiescer.release(step)
        self.daemon_downtime = time.monotonic() - started
        s.report(f"database: copied with the daemon stopped for {self.daemon_downtime:.2f} s")
        return "exact"

    # --- instances and volumes -------------------------------------------------------------

    def hold(self, item: Item, taken: Held | None = None) -> Held:
        """Quiesce one item per its mode (unless `taken` holds its snapshot already, see
        `take_snapshot`) and bind-mount its data at stable paths; on a failure, what it took
        so far is released."""
        held = taken or Held(item)
        try:
            if taken is None:
                self._quiesce(held)
                held.quiesced = time.monotonic()
            self._mount(held)
        except BaseException:
            self.release(held)
            raise
        return held

    def _mount(self, held: Held) -> None:
        """Bind-mount a quiesced item's data at its stable paths."""
        if held.item.exported:  # Incus reads it: nothing to mount
            return
        held.mounts = self._bind(self._mounts(held.item))
        self._keep_import_files(held.item)

    # --- consistency groups (see groups.py) ------------------------------------------------

    def hold_group(self, items: Sequence[Item], group: Group, mounted: bool = False) -> list[Held]:
        """Quiesce a freeze or stop group's members at one moment (its instances side by
        side, then its volumes, whose instances are held already), then mount each at its
        stable paths (unless `mounted`: `mount_live` did, for the gate keeper); on a
        failure, everything it took is released, and the group has no window."""
        helds = [Held(item) for item in items]
        instances = [h for h in helds if h.item.kind == "instance"]
        group.at = _moment()
        try:
            with profile.phase("group quiesce"):
                _first_failure(side_by_side(self._quiesce, instances))
                for held in helds:
                    if held not in instances:
                        self._quiesce(held)
            now = time.monotonic()
            for held in helds:
                held.quiesced = now
            testpoints.reached("group-held", group.name)
            for held in helds:
                if not mounted:
                    self._mount(held)
        except BaseException:
            with contextlib.suppress(Exception):
                self.release_group(helds, group)
            group.at = group.window = None
            raise
        return helds

    def release_group(self, helds: Sequence[Held], group: Group) -> list[float]:
        """Release a freeze or stop group's members (its volumes, then its instances side by
        side); records the group's window (from its first quiesce to its last release) and
        returns each member's window, in order."""
        instances = [h for h in helds if h.item.kind == "instance"]
        windows: dict[int, float | BaseException] = {}
        for k, held in enumerate(helds):
            if held not in instances:
                windows[k] = side_by_side(self.release, [held])[0]
        released = side_by_side(self.release, instances)
        windows |= {helds.index(h): w for h, w in zip(instances, released, strict=True)}
        if helds:
            group.window = time.monotonic() - min(h.started for h in helds)
        ordered = [windows[k] for k in range(len(helds))]
        _first_failure(ordered)
        return [w for w in ordered if isinstance(w, float)]

    def take_group_snapshots(self, items: Sequence[Item], group: Group) -> list[Held]:
        """A snapshot group's temporary snapshots (its instances' and volumes') at one
        moment: every instance frozen, each item snapshotted, every instance thawed, each
        step side by side; the group's window is the time from the first freeze to the last
        thaw. On a failure, the snapshots taken are deleted again, and the group has no
        window."""
        q = self.session.quiescer
        started, group.at = time.monotonic(), _moment()
        instances = [i for i in items if i.kind == "instance"]
        frozen = side_by_side(
            lambda i: (q.freeze_briefly if i.driver in BRIEF_FREEZE else q.freeze)(
                i.project, i.name
            ),
            instances,
        )
        taken: list[Held | BaseException] = []
        try:
            try:
                _first_failure(frozen)
                testpoints.reached("group-held", group.name)
                taken = side_by_side(self.take_snapshot, items)
                _first_failure(taken)
            finally:
                thawed = side_by_side(q.release, [f for f in frozen if isinstance(f, dict)])
                group.window = time.monotonic() - started
            _first_failure(thawed)
        except BaseException:
            side_by_side(self.drop_snapshot, [t for t in taken if isinstance(t, Held)])
            group.at = group.window = None
            raise
        return [t for t in taken if isinstance(t, Held)]

    def _keep_import_files(self, item: Item) -> None:
        """Keep an instance's import files as they are now mounted (quiesced), if asked."""
        if self.import_files is None or item.kind != "instance":
            return
        for path in layout.instance_import_files(item.path):
            content = self._read_staged(path)
            if content is not None:
                self.import_files[path] = content

    def _confirm_import_files(self, item: Item) -> None:
        """Forget kept import files that changed while Borg read the item (Incus may rewrite
        a frozen instance's backup.yaml): what is kept is then what Borg read."""
        if self.import_files is None or item.kind != "instance":
            return
        for path in layout.instance_import_files(item.path):
            if path in self.import_files and self._read_staged(path) != self.import_files[path]:
                del self.import_files[path]

    def _read_staged(self, path: str) -> bytes | None:
        try:
            return self.session.stage.path(PurePosixPath(path)).read_bytes()
        except OSError:
            return None  # not kept: a restore reads it from the archive

    def mount_live(self, item: Item) -> list[Step]:
        """Bind-mount an item's live data at its stable paths, quiescing nothing (hook mode:
        what Borg reads of an item that the gate keeper does not hold)."""
        return self._bind(self._mounts(item, live=True))

    def hold_mounted(self, item: Item) -> Held:
        """Quiesce an item whose live data `mount_live` mounted; its snapshot, if it takes
        one, is mounted over the live data at the same paths until it is released."""
        held = Held(item)
        try:
            self._quiesce(held)
            held.quiesced = time.monotonic()
            self.stack_snapshot(held)
        except BaseException:
            self.release(held)
            raise
        return held

    def stack_snapshot(self, held: Held) -> None:
        """Mount an item's temporary snapshot (if it took one) over the live data that
        `mount_live` mounted, until it is released."""
        if held.snapshot is not None:
            item = held.item
            live = self._mounts(item, live=True)
            over = {r: src for r, src in self._mounts(item).items() if live[r] != src}
            held.mounts = self._bind(over, stacked=True)

    def _bind(self, mounts: dict[PurePosixPath, Path], stacked: bool = False) -> list[Step]:
        stage = self.session.stage
        return self.session.quiescer.bind(
            {stage.path(r): src for r, src in mounts.items()}, stacked
        )

    def take_snapshot(self, item: Item) -> Held:
        """Only the temporary snapshot of a snapshot-mode item (mounted later by `hold`)."""
        held = Held(item)
        self._quiesce(held)
        held.quiesced = time.monotonic()
        return held

    def _quiesce(self, held: Held) -> None:
        item, q = held.item, self.session.quiescer
        snap = self.session.snapshot_name
        if item.mode == "snapshot" and item.exported:
            return  # Incus exports it from a read-only snapshot of its own
        if item.mode == "snapshot" and item.kind == "instance":
            held.snapshot = q.snapshot_instance(item.project, item.name, snap)
        elif item.mode == "snapshot":
            volume = (item.pool, item.project, item.name)
            held.snapshot = q.snapshot_volume(*volume, snap, self.session.member)
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

    def release(self, held: Held, keep_snapshot: bool = False) -> float:
        """Undo one item's mounts and quiesce (but its snapshot, with `keep_snapshot`: see
        `drop_snapshot`); returns its quiesce window in seconds.

        The window is how long the instance could not run freely: from freeze (or stop) to
        its release; for a snapshot, the snapshot's creation; nothing when idle or live.
        """
        q = self.session.quiescer
        if held.mounts:
            self._confirm_import_files(held.item)
        q.release(*reversed(held.mounts))
        held.mounts.clear()
        if not keep_snapshot:
            self.drop_snapshot(held)
        for ref in held.refs:
            self.held[ref][1] -= 1
            if not self.held[ref][1]:
                q.release(self.held.pop(ref)[0])
        held.refs.clear()
        if self.post_on_release:
            self._post_soon(held.item)
        mode = held.item.mode
        if mode in ("freeze", "stop"):
            return time.monotonic() - held.started
        return held.quiesced - held.started if mode == "snapshot" else 0.0

    def drop_snapshot(self, held: Held) -> None:
        """Delete the item's temporary snapshot, if it has one."""
        if held.snapshot is not None:
            self.session.quiescer.release(held.snapshot)
            held.snapshot = None

    def places(self, item: Item) -> dict[str, Path]:
        """An item's members below its `backup/` -> where they lie in its pool."""
        incus_dir = Path(self.session.config.incus.dir)
        args = (incus_dir, item.pool, item.project, item.name, item.snapshots)
        if item.kind == "instance":
            return layout.instance_places(*args)
        return layout.volume_places(*args, item.type == "block")

    def _mounts(self, item: Item, live: bool = False) -> dict[PurePosixPath, Path]:
        incus_dir = Path(self.session.config.incus.dir)
        snap = self.session.snapshot_name if item.mode == "snapshot" and not live else None
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
            partial=plan.partial or any(i.failed for i in plan.instances + plan.volumes),
            incus_borg_version=__version__,
            member=s.member,
            database_note=self.database_note,
            groups=[groups.as_read(g, plan.instances) for g in plan.groups],
        )


def _first_failure(outcomes: Sequence[object]) -> None:
    """Raise the first exception among `outcomes`, if any."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome


def _moment() -> str:
    """Now, as a group's moment is recorded (ISO 8601, milliseconds)."""
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


def _record_post(item: Item, outcome: Outcome | None) -> None:
    """Note what an instance's post command did."""
    if outcome is not None:
        item.post_exit, item.post_duration = outcome.exit_code, outcome.duration
