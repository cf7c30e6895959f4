"""Temporary snapshots taken ahead of Borg and deleted behind it.

A snapshot is atomic, so it may be taken shortly before Borg reaches its item. Taking and
deleting one costs an Incus API call each (about 30 ms here, and Incus runs them one at a
time): one worker thread makes those calls while the lanes read, a few items ahead of them
and behind them, instead of every lane waiting for them at each item.
"""

from __future__ import annotations

import threading

from ..errors import UserError
from ..manifest import Item
from .capture import Capture, Held

AHEAD = 4  # snapshots taken before the lanes reach their items, at most


class Snapshots:
    """The worker taking and deleting the snapshot-mode items' temporary snapshots."""

    def __init__(self, capture: Capture, items: list[Item]) -> None:
        self.capture = capture
        self.items = items
        self._pending = [
            k for k, item in enumerate(items) if item.mode == "snapshot" and item.failed is None
        ]
        self._taken: dict[int, Held | UserError] = {}
        self._drops: list[Held] = []
        self._position = -1  # the gate the lanes reached
        self._closing = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._work, daemon=True)

    def start(self) -> None:
        """Start taking snapshots."""
        self._thread.start()

    def reached(self, k: int) -> None:
        """The lanes are at item `k`'s gate: the worker may take up to AHEAD beyond it."""
        with self._changed:
            self._position = k
            self._changed.notify_all()

    def take(self, k: int) -> Held:
        """Item `k`'s snapshot, once the worker has taken it (raises why it could not)."""
        with self._changed:
            while k not in self._taken:
                self._changed.wait()
            taken = self._taken.pop(k)
        if isinstance(taken, UserError):
            raise taken
        return taken

    def drop(self, held: Held) -> None:
        """Have the worker delete a released item's snapshot."""
        with self._changed:
            self._drops.append(held)
            self._changed.notify_all()

    def close(self) -> None:
        """Let the worker delete every snapshot it took (used or not), then stop it."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._thread.ident is not None:
            self._thread.join()

    def _next(self) -> int | Held | None:
        """The worker's next task, waiting for one: an item to snapshot (its index), a held
        item whose snapshot to delete, or None once closed and done."""
        with self._changed:
            while True:
                if self._drops:
                    return self._drops.pop(0)
                if self._closing:
                    unused = [t for t in self._taken.values() if isinstance(t, Held)]
                    self._taken.clear()
                    if not unused:
                        return None
                    self._drops.extend(unused)
                    continue
                if self._pending and self._pending[0] - self._position <= AHEAD:
                    return self._pending.pop(0)
                self._changed.wait()

    def _work(self) -> None:
        while (target := self._next()) is not None:
            if isinstance(target, Held):
                try:
                    self.capture.drop_snapshot(target)
                except UserError as exc:  # it stays journalled: the run's end retries it
                    self.capture.session.warnings.add(str(exc))
                continue
            try:
                taken: Held | UserError = self.capture.take_snapshot(self.items[target])
            except UserError as exc:
                taken = exc
            with self._changed:
                self._taken[target] = taken
                self._changed.notify_all()
