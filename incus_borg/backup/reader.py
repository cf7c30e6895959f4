"""A run read into one archive per repository, each instance quiesced just in time.

Every repository gets one `borg create` of the whole staging tree (a "lane"); the lanes run
side by side. Borg reads its path arguments in order: the server's files, then each item's
directory, then the manifest. A gate holds each lane's open() of an item's directory. The
lanes move in step: once every lane waits at the gate of item k, every lane has finished the
items before it, so those are released, item k is quiesced (frozen, stopped, snapshotted)
and mounted, and the lanes go on. So an instance is quiesced once for all repositories and
only while it is read, and no instance is quiesced while a lane still waits for its
repository's lock (which borg takes before it reads anything). The manifest is held too: it
is written, with the measured windows, once every lane has reached it.

Bounds: an instance held (frozen or stopped) for longer than `max_window`, or a lane that
shows no sign of progress for `stall_timeout` while it is not waiting at the gate, stops the
lanes that hold the run up; their repositories are skipped for this run with a warning, and
the others go on.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import layout, profile
from ..borg import Borg, BorgProcess, BorgResult, file_statuses, progress_line
from ..config import Repository
from ..errors import UserError
from ..host import testpoints
from ..manifest import Group, Item
from . import groups, patterns, policy
from .capture import Capture, Held
from .gate import Gate, Opening
from .snapshots import Snapshots

TICK = 0.05  # seconds between checks of the bounds while no lane opens anything
STOP_GRACE = 10  # seconds a stopped borg has to clean up before it is killed
WINDOW_MODES = ("freeze", "stop")  # modes that keep an instance from running


@dataclass
class BorgLane:
    """One repository's `borg create`, as a reader drives it."""

    repo: Repository
    args: list[str]
    process: BorgProcess
    failed: str | None = None
    result: BorgResult | None = None

    @property
    def live(self) -> bool:
        """Still reading (not failed, not finished)."""
        return self.failed is None and self.result is None


@dataclass
class Lane(BorgLane):
    """One repository's `borg create` of the run."""

    position: int = -1  # the gate it waits at or last passed; len(items) is the manifest's
    waiting: Opening | None = None  # its open() the gate holds


@dataclass
class Reader:
    """Reads the staging tree into every repository, quiescing one item at a time."""

    capture: Capture
    items: list[Item]
    gate: Gate
    max_window: float
    stall_timeout: float
    show_progress: bool = False
    groups: list[Group] = field(default_factory=list)  # the run's consistency groups
    lanes: list[Lane] = field(default_factory=list)
    # The item quiesced now, or a freeze or stop group's members (held from the first one's
    # gate to the gate after the last one's).
    held: list[tuple[int, Held]] = field(default_factory=list)

    def __post_init__(self) -> None:
        by_name = {g.name: g for g in self.groups}
        self._group = {k: by_name[i.group] for k, i in enumerate(self.items) if i.group}
        self._spans = {
            k: span
            for k, span in groups.spans(self.items).items()
            if self._group[k].mode in WINDOW_MODES
        }
        self.snapshots = Snapshots(self.capture, self.items, self._group)
        self._releaser = ThreadPoolExecutor(1, thread_name_prefix="incus-borg-release")

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
            self.snapshots.start()
            for repo, args in calls:
                process = borg.spawn(args, repo, env, stage_root)
                self.capture.session.quiescer.watch_borg(process.pid)
                self.lanes.append(Lane(repo, args, process))
            testpoints.reached("borg-started")
            while any(lane.live for lane in self.lanes):
                for opening in self.gate.wait(TICK):
                    self._on_open(opening)
                self._reap(borg)
                self._enforce_bounds()
                self._advance()
                self._progress()
        finally:
            os.close(self._manifest_fd)
            self._stop_lanes()
            self._release()
            self._releaser.shutdown()
            self.snapshots.close()
        return self.lanes

    # --- the gate --------------------------------------------------------------------------

    def _on_open(self, opening: Opening) -> None:
        lane = next((lane for lane in self.lanes if lane.process.pid == opening.pid), None)
        if lane is None or not lane.live:  # not one of our borgs: never hold it
            self.gate.allow(opening)
            return
        if opening.path == self._manifest:
            lane.position = len(self.items)
        else:
            lane.position = self._paths[opening.path]
        lane.waiting = opening

    def _advance(self) -> None:
        """Once every live lane waits at the same gate: release what they have all read,
        quiesce the item behind the gate (or write the manifest), and let them through."""
        live = [lane for lane in self.lanes if lane.live]
        if not live or any(lane.waiting is None for lane in live):
            return
        k = live[0].position
        if any(lane.position != k for lane in live):
            return
        self.snapshots.reached(k)
        if k == len(self.items):
            self._release()
            if not all(lane.process.drained() for lane in live):
                return  # the log lines borg wrote before the manifest are not all read yet
            live = self._holding_everything(live)
            if live:
                self._write_manifest()
        elif self.items[k].failed is None:
            self._release_while_holding(k)
        else:
            self._release()
        for lane in live:
            assert lane.waiting is not None
            self.gate.allow(lane.waiting)
            lane.waiting = None

    def _holding_everything(self, live: list[Lane]) -> list[Lane]:
        """The lanes at the manifest's gate whose borg excluded nothing beyond an instance's
        own root filesystem; the others are killed there, before they can commit a run that
        misses part of the server (see `lost`)."""
        kept = []
        for lane in live:
            lost = lost_paths(self.items, lane.process.messages)
            if not lost:
                kept.append(lane)
                continue
            assert lane.waiting is not None
            lane.process.kill()
            self.gate.drop(lane.waiting)
            lane.waiting = None
            lane.failed = f"repository {lane.repo.name} ({lane.repo.path}): {missing(lost)}"
        return kept

    def _release_while_holding(self, k: int) -> None:
        """Release what the lanes have read and quiesce item `k` (with its group's other
        members, for a freeze or stop group; nothing when they are held already): side by
        side (two round trips to Incus in the time of one), unless both keep instances from
        running: a thaw or a start may take a second or more, and item `k`'s instances must
        not be frozen or stopped meanwhile, unread (nor may two freezes of one instance
        cross). Both are done before the lanes go on."""
        span = self._spans.get(k, range(k, k + 1))
        if self.held and self.held[0][0] in span:
            return  # its group is held since its first member's gate
        previous, self.held = self.held, []
        if not previous or (
            self._mode(previous[0][0]) in WINDOW_MODES and self._mode(k) in WINDOW_MODES
        ):
            self._release_all(previous)
            self._hold(k, span)
        else:
            releasing = self._releaser.submit(profile.carried(self._release_all), previous)
            try:
                self._hold(k, span)
            finally:
                releasing.result()
        for _, held in self.held:
            testpoints.reached("held", held.item.ref)

    def _mode(self, k: int) -> str:
        """How item `k` is held: its group's mode, for a member of a freeze or stop group."""
        return self._group[k].mode if k in self._spans else self.items[k].mode

    def _hold(self, k: int, span: range) -> None:
        members = [self.items[j] for j in span]
        try:
            with self.capture.timed("quiesce"):
                if k in self._spans:
                    helds = self.capture.hold_group(members, self._group[k])
                    self.held = list(zip(span, helds, strict=True))
                else:
                    taken = self.snapshots.take(k) if members[0].mode == "snapshot" else None
                    self.held = [(k, self.capture.hold(members[0], taken))]
        except UserError as exc:  # read nothing of them, and say so
            for item in members:
                item.failed = f"could not be quiesced: {exc}"
                self.capture.session.warnings.add(f"{item.kind} {item.ref} left out: {exc}")

    def _release(self) -> None:
        previous, self.held = self.held, []
        self._release_all(previous)

    def _release_all(self, previous: list[tuple[int, Held]]) -> None:
        if not previous:
            return
        k, first = previous[0]
        with self.capture.timed("release"):
            if k in self._spans:
                helds = [held for _, held in previous]
                windows = self.capture.release_group(helds, self._group[k])
                for held, window in zip(helds, windows, strict=True):
                    held.item.window = window
                return
            first.item.window = self.capture.release(first, keep_snapshot=True)
        self.snapshots.drop(first)

    def _write_manifest(self) -> None:
        content = self._manifest_content()
        try:
            os.ftruncate(self._manifest_fd, 0)
            os.pwrite(self._manifest_fd, content, 0)
        except OSError as exc:
            raise UserError(
                f"cannot write {self._manifest}: {exc.strerror}; free space in staging_dir"
            ) from None

    # --- the lanes -------------------------------------------------------------------------

    def _reap(self, borg: Borg) -> None:
        for lane in self.lanes:
            if lane.live and not lane.process.running():
                try:
                    lane.result = borg.finished(lane.process, lane.args, lane.repo)
                except UserError as exc:
                    lane.failed = str(exc)
            if not lane.live:
                lane.process.kill_after(STOP_GRACE)

    def _enforce_bounds(self) -> None:
        """Give up the lanes that hold the run up: those still reading an instance quiesced
        for longer than max_window, and those showing no progress outside the gate."""
        now = time.monotonic()
        if self.held:
            k, held = self.held[0]
            item, mode = held.item, self._mode(k)
            if mode in WINDOW_MODES and now - held.started > self.max_window:
                what = f"{item.kind} {item.ref}"
                if k in self._spans:
                    what = f"group {self._group[k].name}"
                cause = (
                    f"stalled: {what} stayed {mode} for "
                    f"{self.max_window:.0f} s (max_window) while it was read"
                )
                positions = {j for j, _ in self.held}
                for lane in self.lanes:
                    if lane.live and lane.waiting is None and lane.position in positions:
                        self._fail(lane, cause)
        for lane in self.lanes:
            quiet = now - lane.process.last_activity
            limit = max(self.stall_timeout, (lane.repo.lock_wait or 0) + 60)
            if lane.live and lane.waiting is None and quiet > limit:
                self._fail(lane, f"stalled: borg made no progress for {quiet:.0f} s")

    def _fail(self, lane: Lane, cause: str) -> None:
        """Give up a lane: its repository is skipped for the rest of the run. Its borg is
        asked to stop now, and killed (with its ssh) after a grace period."""
        lane.failed = f"repository {lane.repo.name} ({lane.repo.path}): {cause}"
        lane.process.terminate()

    def _stop_lanes(self) -> None:
        """Stop every borg still running, without letting one finish the run: one waiting
        at the gate is killed (past the manifest's gate it could commit an unwritten run),
        the others are asked to stop before the gate lets their pending opens through."""
        for lane in self.lanes:
            if lane.waiting is not None:
                lane.process.kill()
            else:
                lane.process.terminate()
        self.gate.close()
        for lane in self.lanes:
            lane.process.stop()

    def _progress(self) -> None:
        """Show the first live lane's latest progress line, when asked to."""
        lane = next((lane for lane in self.lanes if lane.live), None)
        if self.show_progress and lane is not None and lane.process.progress is not None:
            print("\r" + progress_line(lane.process.progress), end="", file=sys.stderr)


def lost_paths(items: list[Item], messages: list[dict[str, Any]]) -> list[str]:
    """What a borg's `--list` log says it excluded beyond the items' own root filesystems
    and incus-borg's own excludes (below `incus/`)."""
    roots = [
        root
        for item in items
        if item.excludes
        for root in policy.item_roots(item.kind, item.path, item.snapshots)
    ]
    return patterns.beyond(file_statuses(list(messages), "x"), roots, str(layout.INCUS))


def missing(lost: list[str]) -> str:
    """Why a run that excluded `lost` holds nothing, in words."""
    more = f" and {len(lost) - 1} more path(s)" if len(lost) > 1 else ""
    return (
        f"the run would miss {lost[0]}{more}, which it must hold: an exclude pattern reached "
        "beyond its instance's root filesystem (user.incus-borg.exclude); nothing was kept"
    )
