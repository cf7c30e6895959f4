"""The export reader: items that cannot be read in place (zfs, lvm and ceph pools, VMs, block
volumes, or anything with `mode: export`) go into the run's second archive per repository
(`<run>@export`) as the uncompressed tar stream Incus's own backup gives, with no copy on
disk on this side.

Each repository gets one `borg create --read-special` of a directory holding one FIFO per
exported item (`instances/P/N/backup.tar`, `volumes/POOL/P/N/backup.tar`), named in the plan's
order, and nothing else (so `--read-special` reads nothing but those FIFOs; never a block
device). Borg opening a FIFO waits for a writer, which is the moment that item is reached:
once every repository's borg has opened it, the item is quiesced as its mode asks, Incus makes
its backup (uncompressed, not optimized: it restores onto any driver), the item is released,
and the backup is streamed into every FIFO side by side, then deleted. Where the server can
stream a backup without storing it (`direct_backup`), the stream is read as Incus makes it,
and the item stays quiesced until it ends. Borg chunks the stream by content, so an unchanged
instance adds almost nothing to the repository in the next run.

Incus's backup is journalled before it is asked for, so that the server's copy is deleted on
every path (and by the next run after a kill). Before asking, the free space where Incus keeps
backups is checked against the item's size; an item that does not fit is left out with a
warning naming the figures.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

from .. import layout
from ..borg import Borg
from ..config import Repository
from ..errors import UserError
from ..host import testpoints
from ..incus import BackupOf, Incus
from ..manifest import Item
from .capture import Capture, Held
from .journal import Step
from .reader import BorgLane

CHUNK = 1 << 20  # bytes read from Incus at a time
PIPE_SIZE = 1 << 20  # each FIFO's buffer (F_SETPIPE_SZ)
POLL = 0.02  # seconds between looks while waiting for borg
EXPIRY = timedelta(days=1)  # Incus deletes a backup of ours that is left behind by then
F_SETPIPE_SZ = 1031
WINDOW_MODES = ("freeze", "stop")
STREAMING = 4 * CHUNK  # bytes in the borgs when the `export-streaming` pause point comes


def backup_of(item: Item) -> BackupOf:
    """What Incus makes the backup of for an item."""
    return BackupOf(item.kind, item.project, item.name, item.pool if item.kind == "volume" else "")


@dataclass
class Hold:
    """An item quiesced for its export, released once (its window recorded then)."""

    capture: Capture
    held: Held
    released: bool = False

    def held_for(self) -> float:
        """Seconds since the item was quiesced."""
        return time.monotonic() - self.held.started

    def release(self) -> None:
        """Release the item, unless it was released already."""
        if not self.released:
            self.released = True
            with self.capture.timed("release"):
                self.held.item.window = self.capture.release(self.held)


@dataclass(kw_only=True)
class ExportLane(BorgLane):
    """One repository's `borg create` of the exported items."""

    root: Path  # its directory of FIFOs
    fd: int | None = None  # the FIFO of the item being written


@dataclass
class Exporter:
    """Reads the exported items into every repository, one item at a time."""

    capture: Capture
    items: list[Item]
    max_window: float
    stall_timeout: float
    lanes: list[ExportLane] = field(default_factory=list)

    @property
    def incus(self) -> Incus:
        """The server the items are exported from."""
        return self.capture.session.incus

    def read(
        self, borg: Borg, calls: list[tuple[Repository, list[str]]], roots: list[Path]
    ) -> list[ExportLane]:
        """Run every repository's create of the exported items (each in its own directory of
        FIFOs, `roots`) to its end; returns the lanes."""
        for item in self.items:
            self._check_space(item)
        for root in roots:
            for item in self.items:
                fifo = root / layout.stream_path(item.path)
                fifo.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.mkfifo(fifo, 0o600)
        direct = "direct_backup" in self.incus.extensions()
        try:
            for (repo, args), root in zip(calls, roots, strict=True):
                process = borg.spawn(args, repo, cwd=root)
                self.capture.session.quiescer.watch_borg(process.pid)
                self.lanes.append(ExportLane(repo, args, process, root=root))
            for item in self.items:
                self._export(item, direct)
            self._finish(borg)
        finally:
            self._close_all()
            for lane in self.lanes:
                if lane.live:
                    lane.process.stop()
        return self.lanes

    # --- one item ------------------------------------------------------------------------

    def _export(self, item: Item, direct: bool) -> None:
        """Open every live lane's FIFO of the item (waiting for its borg to reach it), then
        quiesce, have Incus make the backup, stream it into every FIFO, and clean up."""
        self._open_all(item)
        if not any(lane.fd is not None for lane in self.lanes):
            return
        try:
            if item.failed is None:
                self._stream_item(item, direct)
        finally:
            self._close_all()

    def _stream_item(self, item: Item, direct: bool) -> None:
        session = self.capture.session
        of = backup_of(item)
        try:
            with self.capture.timed("quiesce"):
                hold = Hold(self.capture, self.capture.hold(item))
        except UserError as exc:
            self._leave_out(item, f"could not be quiesced: {exc}")
            return
        testpoints.reached("held", item.ref)
        step: Step | None = None
        try:
            if direct:
                with self.incus.direct_backup(of) as stream:
                    self._copy(item, stream, hold)
                return
            expires = (datetime.now(UTC) + EXPIRY).strftime("%Y-%m-%dT%H:%M:%SZ")
            step, operation = session.quiescer.backup(of, session.snapshot_name, expires)
            testpoints.reached("export-requested", item.ref)
            if not self._wait_made(item, operation, hold):
                return
            hold.release()
            with self.incus.export_backup(of, session.snapshot_name) as stream:
                self._copy(item, stream, None)
        except UserError as exc:
            self._leave_out(item, f"its export failed: {exc}")
        finally:
            hold.release()
            if step is not None:
                session.quiescer.release(step)

    def _wait_made(self, item: Item, operation: str, hold: Hold) -> bool:
        """Wait for Incus to make the backup; an item held (frozen or stopped) longer than
        max_window is released and left out (its backup would not be consistent)."""
        limit = self.max_window if item.mode in WINDOW_MODES else None
        while not self.incus.wait_operation(operation, 1.0):
            if limit is not None and hold.held_for() > limit:
                hold.release()
                while not self.incus.wait_operation(operation, 5.0):
                    continue
                self._leave_out(
                    item,
                    f"Incus took longer than max_window ({limit:.0f} s) to export it while "
                    f"it was {item.mode}",
                )
                return False
        return True

    def _leave_out(self, item: Item, why: str) -> None:
        item.failed = why
        self.capture.session.warnings.add(f"{item.kind} {item.ref} left out: {why}")

    def _copy(self, item: Item, stream: IO[bytes], hold: Hold | None) -> None:
        """Copy Incus's stream into every live lane's FIFO; with `hold` (a direct backup,
        the item quiesced while it streams), bounded by max_window."""
        read = 0
        while chunk := stream.read(CHUNK):
            read += len(chunk)
            held_too_long = hold is not None and hold.held_for() > self.max_window
            if held_too_long and item.mode in WINDOW_MODES:
                raise UserError(
                    f"its stream outlasted max_window ({self.max_window:.0f} s) while it "
                    f"was {item.mode}"
                )
            for lane in self.lanes:
                if lane.fd is not None:
                    self._write(lane, chunk)
            if read >= STREAMING:
                testpoints.reached("export-streaming", item.ref)
            if not any(lane.fd is not None for lane in self.lanes):
                raise UserError("every repository's borg stopped reading it")
        item.bytes_read = read

    # --- the FIFOs -----------------------------------------------------------------------

    def _open_all(self, item: Item) -> None:
        """Open the item's FIFO of every live lane for writing, once its borg opened it for
        reading (borg reads its paths in order, so it has finished the items before)."""
        waiting = [lane for lane in self.lanes if lane.live]
        while waiting:
            for lane in list(waiting):
                if not lane.live:
                    waiting.remove(lane)
                    continue
                try:
                    lane.fd = os.open(
                        lane.root / layout.stream_path(item.path), os.O_WRONLY | os.O_NONBLOCK
                    )
                except OSError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                        raise
                    self._check_lane(lane)
                    continue
                with contextlib.suppress(OSError):
                    fcntl.fcntl(lane.fd, F_SETPIPE_SZ, PIPE_SIZE)
                waiting.remove(lane)
            if waiting:
                time.sleep(POLL)

    def _check_lane(self, lane: ExportLane) -> None:
        """Give up a lane whose borg ended, or made no progress for too long, before it
        reached the item."""
        if not lane.process.running():
            lane.failed = lane.failed or "its borg ended before it read every exported item"
            return
        quiet = time.monotonic() - lane.process.last_activity
        limit = max(self.stall_timeout, (lane.repo.lock_wait or 0) + 60)
        if quiet > limit:
            self._fail(lane, f"stalled: borg made no progress for {quiet:.0f} s")

    def _write(self, lane: ExportLane, data: bytes) -> None:
        """Write all of `data` into a lane's FIFO; a borg that takes nothing for stall_timeout
        (or that is gone) fails the lane."""
        assert lane.fd is not None
        view = memoryview(data)
        while view:
            _, ready, _ = select.select([], [lane.fd], [], self.stall_timeout)
            if not ready:
                self._fail(lane, f"stalled: borg read nothing for {self.stall_timeout:.0f} s")
                return
            try:
                written = os.write(lane.fd, view)
            except BlockingIOError:
                continue
            except BrokenPipeError:
                self._fail(lane, "its borg stopped reading")
                return
            view = view[written:]

    def _fail(self, lane: ExportLane, cause: str) -> None:
        """Give up a lane: killed first (so that it never stores a stream cut short)."""
        lane.failed = f"repository {lane.repo.name} ({lane.repo.path}): {cause}"
        lane.process.kill()
        if lane.fd is not None:
            os.close(lane.fd)
            lane.fd = None

    def _close_all(self) -> None:
        """End the item's stream in every FIFO (borg goes on to the next path)."""
        for lane in self.lanes:
            if lane.fd is not None:
                os.close(lane.fd)
                lane.fd = None

    def _finish(self, borg: Borg) -> None:
        for lane in self.lanes:
            if not lane.live:
                continue
            try:
                lane.result = borg.finished(lane.process, lane.args, lane.repo)
            except UserError as exc:
                lane.failed = str(exc)

    # --- space ---------------------------------------------------------------------------

    def _check_space(self, item: Item) -> None:
        """Leave out an item whose backup would not fit where Incus keeps backups."""
        incus_dir = Path(self.capture.session.config.incus.dir)
        size = item_size(self.capture, item)
        where = incus_dir / "backups"
        try:
            st = os.statvfs(where if where.exists() else incus_dir)
        except OSError:
            return
        free = st.f_bavail * st.f_frsize
        if size is not None and size > free:
            self._leave_out(
                item,
                f"its export needs about {size >> 20} MiB in {where}, which has "
                f"{free >> 20} MiB free (Incus stores a backup there before it sends it)",
            )


def item_size(capture: Capture, item: Item) -> int | None:
    """About how many bytes Incus's backup of an item takes: its files on disk (with its
    snapshots) where they can be read here, else what Incus says its volume uses, times its
    snapshots; None when nothing tells."""
    session = capture.session
    if item.driver in layout.READABLE_DRIVERS:
        return sum(disk_usage(path) for path in capture.places(item).values())
    used = session.incus.usage(backup_of(item))
    return None if used is None else used * (1 + len(item.snapshots))


def disk_usage(path: Path) -> int:
    """Bytes a file or directory tree takes on disk (not following symlinks)."""
    try:
        st = path.lstat()
    except OSError:
        return 0
    total = st.st_size if not path.is_dir() else 0
    if path.is_dir() and not path.is_symlink():
        for directory, _, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(directory, name)).st_size
    return total
