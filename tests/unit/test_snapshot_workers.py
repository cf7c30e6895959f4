"""The temporary-snapshot workers: one takes, one deletes; neither can leave the run waiting
forever, and every snapshot taken is deleted, used or not."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from incus_borg.backup.capture import Held
from incus_borg.backup.snapshots import Snapshots
from incus_borg.errors import UserError, Warnings
from incus_borg.manifest import Group, Item


def item(name: str) -> Item:
    return Item("instance", "default", name, "fast", "btrfs", "container", [], "Running",
                "snapshot", f"instances/default/{name}")  # fmt: skip


@dataclass
class FakeCapture:
    """Takes and drops snapshots in memory; `broken` names items whose snapshot raises."""

    broken: dict[str, BaseException] = field(default_factory=dict)
    taken: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def session(self) -> Any:
        return type("Session", (), {"warnings": Warnings()})()

    def take_snapshot(self, it: Item) -> Held:
        if it.name in self.broken:
            raise self.broken[it.name]
        with self.lock:
            self.taken.append(it.name)
        return Held(it, snapshot={"op": "delete_instance_snapshot"})

    def drop_snapshot(self, held: Held) -> None:
        with self.lock:
            self.dropped.append(held.item.name)
        held.snapshot = None


def test_every_snapshot_taken_is_deleted_used_or_not() -> None:
    capture = FakeCapture()
    items = [item(f"c{k}") for k in range(6)]
    workers = Snapshots(capture, items)  # type: ignore[arg-type]
    workers.start()
    workers.reached(0)
    first = workers.take(0)
    workers.drop(first)
    workers.close()  # the others were taken ahead and never used
    assert sorted(capture.dropped) == sorted(capture.taken)
    assert "c0" in capture.dropped and len(capture.taken) > 1


@pytest.mark.parametrize("error", [UserError("Incus said no"), RuntimeError("a bug")])
def test_a_snapshot_that_fails_leaves_its_item_out_and_nobody_waiting(error: Exception) -> None:
    capture = FakeCapture(broken={"c1": error})
    items = [item(f"c{k}") for k in range(3)]
    workers = Snapshots(capture, items)  # type: ignore[arg-type]
    workers.start()
    workers.reached(1)
    raised = within(10, lambda: workers.take(1))
    assert isinstance(raised, UserError), raised
    assert "Incus said no" in str(raised) or "unexpected RuntimeError: a bug" in str(raised)
    within(10, workers.close)
    assert sorted(capture.dropped) == sorted(capture.taken)


def within(seconds: float, action: Any) -> BaseException | None:
    """Run `action` in a thread; what it raised (None); fail if it is still running."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{action} waited forever"
    return raised[0] if raised else None


@dataclass
class GroupCapture(FakeCapture):
    """Also takes a group's snapshots in one call; `fail` makes every group call raise."""

    calls: list[list[str]] = field(default_factory=list)
    fail: bool = False

    def take_group_snapshots(self, items: list[Item], group: Group) -> list[Held]:
        self.calls.append([i.name for i in items])
        if self.fail:
            raise UserError("a member could not be frozen")
        return [self.take_snapshot(i) for i in items]


def test_a_group_s_members_are_taken_together_or_not_at_all() -> None:
    items = [item("solo"), item("g1"), item("g2"), item("g3")]
    shop = Group("default/shop", ["default/g1", "default/g2", "default/g3"], "snapshot")
    for it in items[1:]:
        it.group = shop.name
    groups = {k: shop for k in (1, 2, 3)}
    for fail in (False, True):
        capture = GroupCapture(fail=fail)
        workers = Snapshots(capture, items, groups)  # type: ignore[arg-type]
        workers.start()
        workers.reached(0)
        workers.drop(workers.take(0))
        if fail:
            for k in (1, 2, 3):
                with pytest.raises(UserError, match="could not be frozen"):
                    workers.take(k)
        else:
            for k in (1, 2, 3):
                workers.drop(workers.take(k))
        workers.close()
        assert capture.calls == [["g1", "g2", "g3"]]
        assert sorted(capture.dropped) == sorted(capture.taken)
