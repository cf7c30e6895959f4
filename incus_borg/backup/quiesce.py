"""The only code that freezes, stops or snapshots, and that stops the daemon.

Every action is journalled before it is taken; `release` undoes one step and `undo_all`
undoes whatever a run (this one or a dead one) left behind. Undoing is idempotent, and
`undo_all` never stops half-way: every step is tried whatever happened to the others.
Commands run inside an instance (its policy's `pre`) are journalled the same way: the undo
ends what is left of them and runs the instance's `post`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..config import IncusSettings
from ..errors import UserError, Warnings
from ..host import freezer, mounts, processes, testpoints
from ..incus import BackupOf, Incus
from . import commands
from .commands import Outcome
from .journal import Journal, Step

POST_WORKERS = 4  # post commands run side by side while a run goes on
KEEPER_GRACE = 30  # seconds the gate keeper has to release what it holds when asked to end
START_RETRY = 75  # seconds an instance's start is tried again while Incus says "unavailable"


class Quiescer:
    """Takes quiesce actions through Incus, journalling how to undo each."""

    def __init__(
        self,
        incus: Incus,
        settings: IncusSettings,
        journal: Journal,
        warnings: Warnings | None = None,
        report: commands.Say | None = None,
    ) -> None:
        self.incus = incus
        self.settings = settings
        self.journal = journal
        self.warnings = warnings or Warnings()
        self.report = report or (lambda line: None)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._pending: list[Future[None]] = []

    # --- taking actions ------------------------------------------------------------------

    def freeze(self, project: str, name: str) -> Step:
        """Freeze a running instance."""
        return self._take(
            {"op": "unfreeze", "project": project, "name": name},
            lambda: self.incus.change_state(project, name, "freeze"),
        )

    def freeze_briefly(self, project: str, name: str) -> Step:
        """Freeze a running instance for a moment (a snapshot group's snapshots): a
        container through the kernel's freezer, which answers within milliseconds where
        liblxc may sleep a second (see host/freezer.py; Incus does not see such a freeze,
        and says the container runs), anything else through Incus."""
        found = self.incus.instance(project, name, recursion="1")
        init = int((found.get("state") or {}).get("pid") or 0)
        container = found.get("type") == "container"
        state = freezer.state_file(init) if container and init else None
        if state is None:
            return self.freeze(project, name)
        step: Step = {"op": "thaw", "project": project, "name": name, "state": str(state)}
        step |= {"pid": init, "started": processes.start_time(init)}
        return self._take(step, lambda: freezer.freeze(state, f"instance {project}/{name}"))

    def stop(self, project: str, name: str) -> Step:
        """Stop a running instance."""
        return self._take(
            {"op": "start", "project": project, "name": name},
            lambda: self.incus.change_state(project, name, "stop"),
        )

    def snapshot_instance(self, project: str, name: str, snap: str) -> Step:
        """Take a temporary snapshot of an instance."""
        return self._take(
            {"op": "delete_instance_snapshot", "project": project, "name": name, "snap": snap},
            lambda: self.incus.create_instance_snapshot(project, name, snap),
        )

    def snapshot_volume(
        self, pool: str, project: str, name: str, snap: str, member: str | None = None
    ) -> Step:
        """Take a temporary snapshot of a custom volume (the one on cluster member `member`,
        when given)."""
        step = {"op": "delete_volume_snapshot", "pool": pool, "project": project}
        step |= {"name": name, "snap": snap} | ({"member": member} if member else {})
        return self._take(
            step, lambda: self.incus.create_volume_snapshot(pool, project, name, snap, member)
        )

    def backup(self, of: BackupOf, backup: str, expires_at: str) -> tuple[Step, str]:
        """Ask Incus for a backup of an instance or volume (its export), journalled first so
        that the server's copy is deleted on every path; returns the step and the operation
        making it."""
        step: Step = {"op": "delete_backup", "kind": of.kind, "project": of.project}
        step |= {"name": of.name, "pool": of.pool, "backup": backup}
        self.journal.add(step)
        try:
            operation = self.incus.start_backup(of, backup, expires_at)
        except BaseException:
            self._undo_quietly(step)
            raise
        return step, operation

    def bind(self, places: dict[Path, Path], stacked: bool = False) -> list[Step]:
        """Bind-mount each source read-only at its target (target -> source), journalled at
        once; on a failure the mounts made so far are undone. `stacked` mounts go over what
        is mounted there already, and their release uncovers it again."""
        steps = [
            {"op": "unmount", "path": str(target)} | ({"stacked": True} if stacked else {})
            for target in places
        ]
        self.journal.add(*steps)
        for step, (target, source) in zip(steps, places.items(), strict=True):
            try:
                mounts.bind_readonly(source, target)
            except BaseException:
                for made in reversed(steps[: steps.index(step) + 1]):
                    self._undo_quietly(made)
                raise
        return steps

    def guard(self, project: str, name: str, post: str | None, timeout: int) -> Step:
        """Journal, before a command runs inside an instance, how to end it: kill what is
        left of the instance's commands, then run `post` (timeout: each command's bound).
        Its `token` marks the commands' processes."""
        step: Step = {"op": "run_post", "project": project, "name": name}
        step |= {"token": commands.new_token(), "post": post, "timeout": timeout}
        self.journal.add(step)
        return step

    def watch_borg(self, pid: int) -> Step:
        """Journal a borg this run started, so that a run taking over from a dead one ends
        it (and waits until it is reaped: until then its repository lock counts as held)
        before anything else. A borg whose run dies before this is written dies with it."""
        step: Step = {"op": "end_borg", "pid": pid, "started": processes.start_time(pid)}
        self.journal.add(step)
        return step

    def watch_keeper(self, pid: int) -> Step:
        """Journal the gate keeper `hook pre` leaves (see keeper.py): whatever undoes this
        run's steps ends it first (asked, then killed), so that it takes nothing more."""
        step: Step = {"op": "end_keeper", "pid": pid, "started": processes.start_time(pid)}
        self.journal.add(step)
        return step

    def end_keepers(self, recorded: list[Step]) -> None:
        """End the gate keeper a `hook pre` left, if it is still there: it holds the run
        lock. The journal names it (its step is forgotten by `undo_all`, under the lock), and
        so does its own record (`recorded`), should the journal be lost."""
        for step in [s for s in self.journal.steps() if s["op"] == "end_keeper"] + recorded:
            self._undo(step)

    def stop_daemon(self) -> Step:
        """Stop the Incus daemon only (instances keep running)."""
        return self._take({"op": "start_daemon"}, self._stop_daemon)

    def _stop_daemon(self) -> None:
        self.incus.run_daemon_command(self.settings.stop_command, "stop_command")
        if self.incus.reachable():
            raise UserError(
                f"incus.stop_command {self.settings.stop_command!r} returned but the daemon at "
                f"{self.incus.dir} still answers: fix incus.stop_command"
            )

    def _take(self, step: Step, action: Callable[[], object]) -> Step:
        self.journal.add(step)
        try:
            action()
        except BaseException:
            self._undo_quietly(step)
            raise
        return step

    def _undo_quietly(self, step: Step) -> None:
        """Undo a step whose action failed half-way; a failure here stays journalled."""
        try:
            self.release(step)
        except Exception:
            return

    # --- undoing -------------------------------------------------------------------------

    def release(self, *steps: Step) -> Outcome | None:
        """Undo steps in the order given (those that still need undoing), then forget them
        (one journal record for all); returns what a `post` command among them did."""
        outcome = None
        for step in steps:
            outcome = self._undo(step) or outcome
        if steps:
            self.journal.remove(*steps)
        return outcome

    def release_later(self, step: Step, then: Callable[[Outcome | None], None]) -> None:
        """Undo one step in the background (a `post` command, while the run goes on), then
        pass what its command did to `then`. `wait` and `undo_all` wait for it; a step
        whose undo failed stays journalled, and `undo_all` tries it again."""
        with self._lock:  # a group's members are released side by side
            if self._pool is None:
                self._pool = ThreadPoolExecutor(POST_WORKERS, thread_name_prefix="incus-borg-post")
            self._pending.append(self._pool.submit(lambda: then(self.release(step))))

    def wait(self) -> None:
        """Wait for the steps being undone in the background."""
        for future in self._pending:
            try:
                future.result()
            except Exception:  # still journalled: undo_all tries it again
                continue
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _undo(self, step: Step) -> Outcome | None:
        op = step["op"]
        if op == "run_post":
            return commands.finish(self.incus, step, self.report, self.warnings.add)
        if op in ("end_borg", "end_keeper"):
            # A keeper holds nothing once it is a zombie (its lock went with its files).
            keeper = op == "end_keeper"
            graceful = KEEPER_GRACE if keeper else None
            if not processes.end(
                step["pid"], step["started"], graceful=graceful, reaped=not keeper
            ):
                raise UserError(f"{describe(step)} was killed but is still there")
        elif op == "start_daemon":
            if not self.incus.reachable():
                self.incus.run_daemon_command(self.settings.start_command, "start_command")
                self.incus.wait_ready()
        elif op in ("unfreeze", "start"):
            self._change_back(step["project"], step["name"], op)
        elif op == "thaw":
            self._thaw(step)
        elif op == "delete_instance_snapshot":
            args = (step["project"], step["name"], step["snap"])
            self._delete(lambda: self.incus.delete_instance_snapshot(*args), args[2],
                         lambda: self.incus.instance_snapshots(*args[:2]))  # fmt: skip
        elif op == "delete_volume_snapshot":
            vol, member = (step["pool"], step["project"], step["name"]), step.get("member")
            self._delete(lambda: self.incus.delete_volume_snapshot(*vol, step["snap"], member),
                         step["snap"], lambda: self.incus.volume_snapshots(*vol, member))  # fmt: skip
        elif op == "unmount" and step.get("stacked"):
            mounts.unmount_top(Path(step["path"]))
        elif op == "unmount":
            mounts.unmount_or_detach(Path(step["path"]))
        elif op == "delete_backup":
            self.incus.delete_backup(backup_of(step), step["backup"])
        else:
            raise UserError(f"unknown step {op!r} in {self.journal.path}: remove it by hand")
        return None

    def _settle(self, step: Step) -> None:
        """Wait for what a dead run may have left under way in Incus on the step's instance
        or volume (a freeze or snapshot it requested), so that undoing it is not undone."""
        if step["op"] == "delete_backup":
            self.incus.settle(backup_of(step).resource, step["project"], step["name"])
        elif step["op"] in (
            "unfreeze",
            "start",
            "delete_instance_snapshot",
            "delete_volume_snapshot",
        ):
            kind = "storage_volumes" if step["op"] == "delete_volume_snapshot" else "instances"
            self.incus.settle(kind, step["project"], step["name"])

    @staticmethod
    def _thaw(step: Step) -> None:
        """Thaw a container frozen through the kernel's freezer; nothing to do once its init
        is gone (so is the cgroup it froze)."""
        if processes.alive(step["pid"], step["started"]):
            freezer.thaw(Path(step["state"]), f"instance {step['project']}/{step['name']}")

    def _change_back(self, project: str, name: str, action: str) -> None:
        """Unfreeze (or start) an instance this run froze (or stopped); nothing to do when
        it is no longer frozen (or stopped)."""
        undone = "Frozen" if action == "unfreeze" else "Stopped"
        try:
            if action == "start":
                self._start(project, name)
            else:
                self.incus.change_state(project, name, action)
        except UserError:
            if self.incus.instance_status(project, name) == undone:
                raise

    def _start(self, project: str, name: str) -> None:
        """Start an instance again; while a network or pool it needs is still unavailable
        (after the daemon's restart, Incus retries one it could not start once a minute),
        try again."""
        deadline = time.monotonic() + START_RETRY
        while True:
            try:
                self.incus.change_state(project, name, "start")
                return
            except UserError as exc:
                if "unavailable" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(1)

    @staticmethod
    def _delete(delete: Callable[[], None], snap: str, existing: Callable[[], list[str]]) -> None:
        """Delete a temporary snapshot; nothing to do when it is gone already."""
        try:
            delete()
        except UserError:
            if snap in existing():
                raise

    def undo_all(self, warnings: Warnings) -> list[str]:
        """Undo every journalled step: the gate keeper and the run's borgs first (nothing may
        quiesce or read an instance once it is released), then the daemon, then newest to
        oldest. Every step is tried,
        whatever happens to the others or to the journal.

        Returns what could not be undone (it stays journalled for the next run).
        """
        self.wait()
        steps = self.journal.steps()
        first = ("end_keeper", "end_borg", "start_daemon")
        ordered = [s for op in first for s in steps if s["op"] == op]
        ordered += [s for s in reversed(steps) if s["op"] not in first]
        left = []
        for step in ordered:
            try:
                self._settle(step)
                self._undo(step)
            except Exception as exc:
                warnings.add(f"could not undo {describe(step)}: {exc}")
                left.append(describe(step))
                continue
            try:
                self.journal.remove(step)
            except Exception as exc:
                warnings.add(f"{describe(step)} was undone but the journal says otherwise: {exc}")
            testpoints.reached("undone", step["op"])
        if not left:
            self.journal.clear()
        return left


def backup_of(step: Step) -> BackupOf:
    """What a journalled backup step is a backup of."""
    return BackupOf(step["kind"], step["project"], step["name"], step.get("pool", ""))


def describe(step: Step) -> str:
    """A step, in words."""
    op = step["op"]
    target = f"{step.get('project')}/{step.get('name')}"
    return {
        "end_borg": f"borg (pid {step.get('pid')}) of the run",
        "end_keeper": f"the gate keeper (pid {step.get('pid')}) of `hook pre`",
        "start_daemon": "the stopped Incus daemon",
        "unfreeze": f"the freeze of {target}",
        "thaw": f"the freeze of {target} (kernel freezer)",
        "start": f"the stop of {target}",
        "delete_instance_snapshot": f"snapshot {target}/{step.get('snap')}",
        "delete_volume_snapshot": f"volume snapshot {step.get('pool')}/{target}/{step.get('snap')}",
        "unmount": f"the mount at {step.get('path')}",
        "delete_backup": f"Incus's backup {step.get('backup')} of {step.get('kind')} {target}",
        "run_post": f"the commands of {target} (ending them, then its post command)",
    }.get(op, str(op))
