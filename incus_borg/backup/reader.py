"""A run read into one archive per repository, each instance quiesced just in time.

Every repository gets one `borg create` of the whole staging tree (a "lane"); the lanes run
side by side. Borg reads its path arguments in order: the server's files, then each item's
directory, then the manifest. A gate holds each lane's open() of an item's directory; at that
moment every item before it is done in that lane, so the items every lane has passed are
released, and the item is quiesced (frozen, stopped, snapshotted) and mounted, then the lane
goes on. The manifest is held too: it is written with the measured windows once every lane
has reached it. So an instance is quiesced only while it is read, once for all repositories.

Bounds: an item quiesced (frozen or stopped) for longer than `max_window`, or a lane that
logs nothing for `stall_timeout`, stops the lanes that hold it up; their repositories are
skipped for this run with a warning, and everything is released.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import layout
from ..borg import Borg, BorgProcess, BorgResult, progress_line
from ..config import Repository
from ..errors import UserError
from ..manifest import Item
from .capture import Capture, Held
from .gate import Gate, Opening

TICK = 0.05  # seconds between checks of the bounds while no lane opens anything
STOP_GRACE = 10  # seconds a stopped borg has to clean up before it is killed
WINDOW_MODES = ("freeze", "stop")  # modes that keep an instance from running


@dataclass
class Lane:
    """One repository's `borg create` of the run."""

    repo: Repository
    args: list[str]
    process: BorgProcess
    position: int = -1  # the index of the item it reads; len(items) at the manifest
    failed: str | None = None
    result: BorgResult | None = None

    @property
    def live(self) -> bool:
        """Still reading (not failed, not finished)."""
        return self.failed is None and self.result is None


@dataclass
class Reader:
    """Reads the staging tree into every repository, quiescing one item at a time."""

    capture: Capture
    items: list[Item]
    gate: Gate
    max_window: float
    stall_timeout: float
    show_progress: bool = False
    lanes: list[Lane] = field(default_factory=list)
    held: dict[int, Held] = field(default_factory=dict)
    waiting: list[Opening] = field(default_factory=list)  # lanes at the manifest

    def read(
        self,
        borg: Borg,
        calls: list[tuple[Repository, list[str]]],
        stage_root: Path,
        env: dict[str, str],
        manifest: Callable[[], bytes],
    ) -> list[Lane]:
        """Gate every item's directory and the manifest, then run every repository's create
        (in `stage_root`) to its end; returns the lanes (each with a result or why it
        failed). The manifest is written, with `manifest()`, through a descriptor opened
        before the gate: this process's own open of a gated path would wait for itself."""
        self._manifest_content = manifest
        self._paths = {str(stage_root / item.path): k for k, item in enumerate(self.items)}
        self._manifest = str(stage_root / layout.MANIFEST)
        self._manifest_fd = os.open(self._manifest, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for path in [*self._paths, self._manifest]:
                self.gate.mark(Path(path))
            for repo, args in calls:
                self.lanes.append(Lane(repo, args, borg.spawn(args, repo, env, stage_root)))
            while any(lane.live for lane in self.lanes):
                for opening in self.gate.wait(TICK):
                    self._on_open(opening)
                self._reap(borg)
                self._enforce_bounds()
                for lane in self.lanes:
                    lane.process.kill_after(STOP_GRACE)
                self._release_passed()
                self._open_manifest()
                self._progress()
        finally:
            os.close(self._manifest_fd)
            self._stop_lanes()
            for k in sorted(self.held):
                self._release(k)
        return self.lanes

    def _stop_lanes(self) -> None:
        """Stop every borg still running, without letting one finish the run: one waiting
        at the manifest is killed (it could otherwise read an unwritten manifest and commit),
        the others are asked to stop before the gate lets their pending opens through."""
        for lane in self.lanes:
            if lane.position == len(self.items):
                lane.process.kill()
            else:
                lane.process.terminate()
        self.gate.close()
        for lane in self.lanes:
            lane.process.stop()

    def _progress(self) -> None:
        """Show the first live lane's latest progress line, when asked to."""
        lane = next((lane for lane in self.lanes if lane.live), None)
        if self.show_progress and lane is not None:
            latest = lane.process.progress
            if latest is not None:
                print("\r" + progress_line(latest), end="", file=sys.stderr)

    # --- events ----------------------------------------------------------------------------

    def _lane(self, pid: int) -> Lane | None:
        return next((lane for lane in self.lanes if lane.process.pid == pid), None)

    def _on_open(self, opening: Opening) -> None:
        lane = self._lane(opening.pid)
        if lane is None or not lane.live:  # not one of our borgs: never hold it
            self.gate.allow(opening)
            return
        if opening.path == self._manifest:
            lane.position = len(self.items)
            self.waiting.append(opening)
            return
        k = self._paths[opening.path]
        lane.position = k
        self._release_passed()
        item = self.items[k]
        if k not in self.held and item.failed is None:
            try:
                self.held[k] = self.capture.hold(item)
            except UserError as exc:  # read nothing of it, and say so
                item.failed = f"could not be quiesced: {exc}"
                self.capture.session.warnings.add(f"{item.kind} {item.ref} left out: {exc}")
        self.gate.allow(opening)

    def _open_manifest(self) -> None:
        """Write the manifest and let the lanes read it, once every live lane is there."""
        live = [lane for lane in self.lanes if lane.live]
        if not self.waiting or any(lane.position < len(self.items) for lane in live):
            return
        for k in sorted(self.held):
            self._release(k)
        content = self._manifest_content()
        try:
            os.ftruncate(self._manifest_fd, 0)
            os.pwrite(self._manifest_fd, content, 0)
        except OSError as exc:
            raise UserError(
                f"cannot write {self._manifest}: {exc.strerror}; free space in staging_dir"
            ) from None
        for opening in self.waiting:
            self.gate.allow(opening)
        self.waiting.clear()

    def _reap(self, borg: Borg) -> None:
        for lane in self.lanes:
            if lane.live and not lane.process.running():
                try:
                    lane.result = borg.finished(lane.process, lane.args, lane.repo)
                except UserError as exc:
                    lane.failed = str(exc)

    # --- releasing and bounds --------------------------------------------------------------

    def _release_passed(self) -> None:
        """Release the items every live lane has finished reading."""
        live = [lane.position for lane in self.lanes if lane.live]
        passed = min(live) if live else len(self.items)
        for k in sorted(self.held):
            if k < passed:
                self._release(k)

    def _release(self, k: int) -> None:
        held = self.held.pop(k)
        held.item.window = self.capture.release(held)

    def _enforce_bounds(self) -> None:
        now = time.monotonic()
        for k, held in list(self.held.items()):
            if held.item.mode in WINDOW_MODES and now - held.started > self.max_window:
                cause = (
                    f"stalled: {held.item.kind} {held.item.ref} stayed {held.item.mode} for "
                    f"{self.max_window:.0f} s (max_window) while it was read"
                )
                for lane in self.lanes:
                    if lane.live and lane.position <= k:
                        self._fail(lane, cause)
        for lane in self.lanes:
            quiet = now - lane.process.last_activity
            at_gate = lane.position == len(self.items)
            limit = max(self.stall_timeout, (lane.repo.lock_wait or 0) + 60)
            if lane.live and not at_gate and quiet > limit:
                self._fail(lane, f"stalled: borg made no progress for {quiet:.0f} s")

    def _fail(self, lane: Lane, cause: str) -> None:
        """Give up a lane: its repository is skipped for the rest of the run. Its borg is
        asked to stop now, and killed after a grace period; the items only it held up are
        released meanwhile."""
        lane.failed = f"repository {lane.repo.name} ({lane.repo.path}): {cause}"
        lane.process.terminate()
