"""The only code that freezes, stops or snapshots, and that stops the daemon.

Every action is journalled before it is taken; `release` undoes one step and `undo_all`
undoes whatever a run (this one or a dead one) left behind. Undoing is idempotent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

from .. import mounts
from ..config import IncusSettings
from ..errors import UserError, Warnings
from ..incus import Incus
from .journal import Journal, Step


class Quiescer:
    """Takes quiesce actions through Incus, journalling how to undo each."""

    def __init__(self, incus: Incus, settings: IncusSettings, journal: Journal) -> None:
        self.incus = incus
        self.settings = settings
        self.journal = journal

    # --- taking actions ------------------------------------------------------------------

    def freeze(self, project: str, name: str) -> Step:
        """Freeze a running instance."""
        return self._take(
            {"op": "unfreeze", "project": project, "name": name},
            lambda: self.incus.change_state(project, name, "freeze"),
        )

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

    def snapshot_volume(self, pool: str, project: str, name: str, snap: str) -> Step:
        """Take a temporary snapshot of a custom volume."""
        step = {"op": "delete_volume_snapshot", "pool": pool, "project": project}
        step |= {"name": name, "snap": snap}
        return self._take(
            step, lambda: self.incus.create_volume_snapshot(pool, project, name, snap)
        )

    def bind(self, source: Path, target: Path) -> Step:
        """Bind-mount `source` read-only at `target`."""
        return self._take(
            {"op": "unmount", "path": str(target)}, lambda: mounts.bind_readonly(source, target)
        )

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
        with contextlib.suppress(UserError):
            self.release(step)

    # --- undoing -------------------------------------------------------------------------

    def release(self, step: Step) -> None:
        """Undo one step (if it still needs undoing) and forget it."""
        op = step["op"]
        if op == "start_daemon":
            if not self.incus.reachable():
                self.incus.run_daemon_command(self.settings.start_command, "start_command")
                self.incus.wait_ready()
        elif op == "unfreeze":
            if self.incus.instance_status(step["project"], step["name"]) == "Frozen":
                self.incus.change_state(step["project"], step["name"], "unfreeze")
        elif op == "start":
            if self.incus.instance_status(step["project"], step["name"]) == "Stopped":
                self.incus.change_state(step["project"], step["name"], "start")
        elif op == "delete_instance_snapshot":
            if step["snap"] in self.incus.instance_snapshots(step["project"], step["name"]):
                self.incus.delete_instance_snapshot(step["project"], step["name"], step["snap"])
        elif op == "delete_volume_snapshot":
            args = (step["pool"], step["project"], step["name"])
            if step["snap"] in self.incus.volume_snapshots(*args):
                self.incus.delete_volume_snapshot(*args, step["snap"])
        elif op == "unmount":
            mounts.unmount(Path(step["path"]))
        else:
            raise UserError(f"unknown step {op!r} in {self.journal.path}: remove it by hand")
        self.journal.remove(step)

    def undo_all(self, warnings: Warnings) -> bool:
        """Undo every journalled step: the daemon first, then newest to oldest.

        Returns whether everything was undone; what failed stays in the journal.
        """
        steps = self.journal.steps()
        ordered = [s for s in steps if s["op"] == "start_daemon"]
        ordered += [s for s in reversed(steps) if s["op"] != "start_daemon"]
        clean = True
        for step in ordered:
            try:
                self.release(step)
            except UserError as exc:
                warnings.add(f"could not undo {describe(step)}: {exc}")
                clean = False
        if clean:
            self.journal.clear()
        return clean


def describe(step: Step) -> str:
    """A step, in words."""
    op = step["op"]
    target = f"{step.get('project')}/{step.get('name')}"
    return {
        "start_daemon": "the stopped Incus daemon",
        "unfreeze": f"the freeze of {target}",
        "start": f"the stop of {target}",
        "delete_instance_snapshot": f"snapshot {target}/{step.get('snap')}",
        "delete_volume_snapshot": f"volume snapshot {step.get('pool')}/{target}/{step.get('snap')}",
        "unmount": f"the mount at {step.get('path')}",
    }.get(op, str(op))
