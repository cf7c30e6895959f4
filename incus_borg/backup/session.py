"""One backup session: the run lock, recovery of what a dead run left, the journal, and
undoing every quiesce on every path. `backup` and `hook pre`/`hook post` all go through it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from .. import layout, signals
from ..config import Config
from ..errors import UserError, Warnings
from ..incus import Incus
from .journal import Journal
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
        self.quiescer = Quiescer(incus, config.incus, self.journal)
        self.stage = Stage(Path(config.staging_dir))
        now = datetime.now()
        self.created = now.astimezone().isoformat(timespec="seconds")
        self.snapshot_name = layout.SNAPSHOT_PREFIX + now.strftime("%Y%m%d%H%M%S")
        self.run = layout.run_name(config.archive_name_format, now)

    @contextmanager
    def locked(self, command: str) -> Iterator[None]:
        """Hold the run lock; first undo whatever an earlier run left quiesced."""
        with self.journal.locked():
            with signals.shielded():
                self._recover(command)
            yield

    @contextmanager
    def holding(self, kind: str, release: bool = True) -> Iterator[None]:
        """Journal a run of `kind` ("backup" or "hook"); SIGTERM and SIGHUP interrupt it like
        Ctrl-C. Everything it quiesced is undone when it fails or is interrupted, and when it
        ends if `release` (hook pre leaves it held for hook post)."""
        self.journal.begin(kind, self.run)
        try:
            with signals.interruptible():
                yield
        except BaseException:
            with signals.shielded():
                self.finish()
            raise
        if release:
            with signals.shielded():
                self.finish()

    def finish(self) -> bool:
        """Undo every quiesce and mount of this run, then empty staging."""
        clean = self.quiescer.undo_all(self.warnings)
        if clean:
            self.stage.cleanup()
        return clean

    def _recover(self, command: str) -> None:
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
