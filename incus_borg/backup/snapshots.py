"""Temporary snapshots taken ahead of Borg and deleted behind it.

A snapshot is atomic, so it may be taken shortly before Borg reaches its item. Taking and
deleting one costs an Incus API call each (about 35 and 25 ms here): two worker threads,
one taking and one deleting, make those calls while the lanes read, a few items ahead of
them and behind them, instead of every lane waiting for them at each item (Incus runs a
creation and a deletion side by side in about 45 ms, against 60 ms one after the other).
A consistency group's snapshots are taken together, at one moment (Capture.take_group_snapshots).
"""

from __future__ import annotations

import threading

from .. import profile
from ..errors import UserError
from ..manifest import Group, Item
from .capture import Capture, Held

AHEAD = 4  # snapshots taken before the lanes reach their items, at most


class Snapshots:
    """The worker taking and deleting the snapshot-mode items' temporary snapshots."""

    def __init__(
        self, capture: Capture, items: list[Item], groups: dict[int, Group] | None = None
    ) -> None:
        self.capture = capture
        self.items = items
        self.groups = groups or {}  # item index -> its consistency group
        # What to take, in order: one item, or a group's members (taken at one moment).
        self._pending: list[list[int]] = []
        for k, item in enumerate(items):
            if item.mode != "snapshot" or item.failed is not None:
                continue
            last = self._pending[-1] if self._pending else []
            if k in self.groups and last and self.groups.get(last[0]) is self.groups[k]:
                last.append(k)
            else:
                self._pending.append([k])
        self._taken: dict[int, Held | UserError] = {}
        self._drops: list[Held] = []
        self._position = -1  # the gate the lanes reached
        self._closing = False
        self._taking = True  # the taking worker may still add a snapshot to `_taken`
        self._changed = threading.Condition()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start taking snapshots (the workers' time counts in the phase this is called in)."""
        self._threads = [
            threading.Thread(target=profile.carried(work), daemon=True)
            for work in (self._take_all, self._drop_all)
        ]
        for thread in self._threads:
            thread.start()

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
        for thread in self._threads:
            thread.join()

    def _next_to_take(self) -> list[int] | None:
        """The next items to snapshot (their indexes), waiting for them; None once closed."""
        with self._changed:
            while True:
                if self._closing:
                    self._taking = False
                    self._changed.notify_all()
                    return None
                if self._pending and self._pending[0][0] - self._position <= AHEAD:
                    return self._pending.pop(0)
                self._changed.wait()

    def _next_to_drop(self) -> Held | None:
        """The next held item whose snapshot to delete, waiting for one; once closed, every
        snapshot taken and not used, then None."""
        with self._changed:
            while True:
                if self._drops:
                    return self._drops.pop(0)
                if self._closing and not self._taking:
                    unused = [t for t in self._taken.values() if isinstance(t, Held)]
                    self._taken.clear()
                    if not unused:
                        return None
                    self._drops.extend(unused)
                    continue
                self._changed.wait()

    def _take_all(self) -> None:
        try:
            while (unit := self._next_to_take()) is not None:
                taken = self._take(unit)
                with self._changed:
                    self._taken |= dict(zip(unit, taken, strict=True))
                    self._changed.notify_all()
        finally:  # the deleting worker may now delete what was taken and not used
            with self._changed:
                self._taking = False
                self._changed.notify_all()

    def _take(self, unit: list[int]) -> list[Held | UserError]:
        """The snapshots of one item, or of a group's members together (all or none)."""
        items = [self.items[k] for k in unit]
        try:
            if unit[0] in self.groups:
                return list(self.capture.take_group_snapshots(items, self.groups[unit[0]]))
            return [self.capture.take_snapshot(items[0])]
        except UserError as exc:
            failed = exc
        except Exception as exc:  # the items are left out, and the worker goes on
            failed = UserError(f"unexpected {type(exc).__name__}: {exc}")
        return [failed] * len(unit)

    def _drop_all(self) -> None:
        while (held := self._next_to_drop()) is not None:
            try:
                self.capture.drop_snapshot(held)
            except UserError as exc:  # it stays journalled: the run's end retries it
                self.capture.session.warnings.add(str(exc))
