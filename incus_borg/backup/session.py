"""One backup session: the run lock, recovery of what a dead run left, the journal, and
undoing every quiesce on every path. `backup` and `hook pre`/`hook post` all go through it."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from .. import layout, profile
from ..config import Config
from ..errors import UserError, Warnings
from ..host import mounts, signals
from ..incus import Incus
from .journal import Journal
from .plan import Plan, build
from .quiesce import Quiescer
from .stage import Stage

Report = Callable[[str], None]


class Session:
    """The lifetime of one run: what it holds, and the promise to release it."""

    def __init__(
        self, config: Config, mode: str, incus: Incus, warnings: Warnings, report: Report
    ) -> None:
        self.config = config
        self.mode = mode
        self.incus = incus
        self.warnings = warnings
        self.report = report
        self.journal = Journal(Path(config.staging_dir))
        self.quiescer = Quiescer(incus, config.incus, self.journal, warnings, report)
        self.stage = Stage(Path(config.staging_dir))
        self.now = datetime.now()
        self.created = self.now.astimezone().isoformat(timespec="seconds")
        self.snapshot_name = layout.SNAPSHOT_PREFIX + self.now.strftime("%Y%m%d%H%M%S")

    @functools.cached_property
    def member(self) -> str | None:
        """The cluster member this run backs up (None when the server is not clustered)."""
        return self.incus.member()

    @functools.cached_property
    def run(self) -> str:
        """The run's name (asks Incus whether it is a cluster member the first time)."""
        return layout.run_name(self.config.archive_name_format, self.now, member=self.member)

    def plan(self, selection: list[str], command_line: str | None) -> Plan:
        """What this run reads: the server's instances and volumes (or `selection`), each
        with its policy (`command_line`: --mode, overriding every other source)."""
        return build(
            self.incus,
            self.mode,
            selection,
            command_line=command_line,
            member=self.member,
            rules=self.config.policy,
            declared=self.config.groups,
        )

    @contextmanager
    def locked(self, command: str) -> Iterator[None]:
        """Hold the run lock; first refuse a staging directory incus-borg did not make, and
        undo whatever an earlier run left quiesced."""
        with self.journal.locked():
            self.stage.check()
            with signals.shielded(), profile.phase("recover"):
                self._recover(command)
            yield

    @contextmanager
    def holding(self, kind: str, release: bool = True) -> Iterator[None]:
        """Journal a run of `kind` ("backup" or "hook"); SIGTERM and SIGHUP interrupt it like
        Ctrl-C. Everything it quiesced is undone when it fails or is interrupted, and when it
        ends if `release` (hook pre leaves it held for hook post, and marks it ready)."""
        self.journal.begin(kind, self.run)
        try:
            with signals.interruptible():
                yield
        except BaseException:
            with signals.shielded():
                self.finish()
            raise
        if not release:
            self.journal.mark("ready")
            return
        with signals.shielded(), profile.phase("release all and clean up"):
            left = self.finish()
        if left:
            raise UserError(
                f"could not undo {', '.join(left)}: see the warnings; the next incus-borg run "
                "undoes it"
            )

    def finish(self) -> list[str]:
        """Undo every quiesce and mount of this run, then empty staging; returns what could
        not be undone."""
        left = self.quiescer.undo_all(self.warnings)
        left += self._unmount_strays()
        if not left:
            self.stage.cleanup()
        return left

    def _unmount_strays(self) -> list[str]:
        """Unmount what is still mounted in our staging directory though no journal names
        it (a journal lost or never written); returns what could not be unmounted."""
        if not self.stage.ours:
            return []
        left = []
        for point in mounts.mounts_below(self.stage.root):
            try:
                mounts.unmount(point)
            except UserError as exc:
                self.warnings.add(str(exc))
                left.append(f"the mount at {point}")
        return left

    def _recover(self, command: str) -> None:
        """Undo what an earlier run left, unless a complete `hook pre` awaits its `hook post`."""
        data = self.journal.read() or {}
        kept = any(step["op"] == "end_keeper" for step in data.get("steps", []))
        ready = data.get("kind") == "hook" and data.get("phase") == "ready"
        if ready and command == "backup" and not kept:  # a live keeper holds the lock
            raise UserError(
                f"a hook-mode backup ({data.get('run')}) is under way: `incus-borg hook pre` ran "
                "and `incus-borg hook post` did not; if nothing is reading the staging tree, "
                "run `incus-borg hook post`"
            )
        if data.get("steps") and command != "hook post":
            what = "run"
            if data.get("kind") == "hook":
                what = (
                    "hook-mode run, whose gate keeper is gone,"
                    if kept
                    else ("`hook pre` that did not finish")
                )
            self.warnings.add(
                f"an earlier {what} ({data.get('run')}) left {len(data['steps'])} step(s) "
                "to undo: undoing them first"
            )
        left = self.finish()
        if left:
            raise UserError(
                f"could not undo what an earlier run left ({', '.join(left)}): see "
                f"{self.journal.path} and the warnings above"
            )
        self.journal.clear()
