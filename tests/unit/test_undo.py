"""Undoing never stops half-way: every step is tried whatever happens to the others, and a
journal that cannot be written does not stop the undo."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from incus_borg.backup.journal import Journal
from incus_borg.backup.quiesce import Quiescer
from incus_borg.config import IncusSettings
from incus_borg.errors import UserError, Warnings
from incus_borg.host import processes


class FakeIncus:
    """Records state changes; `broken` names instances whose unfreeze fails."""

    def __init__(self, broken: set[str]) -> None:
        self.broken = broken
        self.unfrozen: list[str] = []

    def change_state(self, project: str, name: str, action: str) -> None:
        if name in self.broken:
            raise UserError(f"cannot {action} {name}")
        self.unfrozen.append(name)

    def instance_status(self, project: str, name: str) -> str:
        return "Frozen"

    def settle(self, kind: str, project: str, name: str) -> None:
        """Nothing is under way."""


def quiescer(tmp_path: Path, broken: set[str]) -> tuple[Quiescer, FakeIncus, Journal]:
    incus = FakeIncus(broken)
    journal = Journal(tmp_path / "staging")
    journal.begin("backup", "run")
    q = Quiescer(incus, IncusSettings(), journal)  # type: ignore[arg-type]
    return q, incus, journal


def freeze_steps(journal: Journal, names: list[str]) -> None:
    journal.add(*({"op": "unfreeze", "project": "default", "name": n} for n in names))


def test_a_failing_step_does_not_stop_the_others(tmp_path: Path) -> None:
    q, incus, journal = quiescer(tmp_path, broken={"b"})
    freeze_steps(journal, ["a", "b", "c"])
    warnings = Warnings()
    left = q.undo_all(warnings)
    assert incus.unfrozen == ["c", "a"]  # newest first, b tried and failed in between
    assert left == ["the freeze of default/b"]
    assert [s["name"] for s in journal.steps()] == ["b"]  # kept for the next run
    assert "could not undo the freeze of default/b" in warnings.messages[0]


def test_a_journal_that_cannot_be_written_does_not_stop_the_undo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, incus, journal = quiescer(tmp_path, broken=set())
    freeze_steps(journal, ["a", "b"])

    def full(*args: Any) -> None:
        raise UserError("cannot write the journal: No space left on device")

    monkeypatch.setattr(journal, "remove", full)
    warnings = Warnings()
    assert q.undo_all(warnings) == []
    assert incus.unfrozen == ["b", "a"]
    assert len(warnings.messages) == 2 and "No space left" in warnings.messages[0]


def test_the_journal_survives_a_torn_line_and_resumes(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "staging")
    journal.begin("backup", "run")
    freeze_steps(journal, ["a"])
    raw = bytearray(journal.path.read_bytes())
    end = raw.index(0)
    raw[end : end + 9] = b'{"done": '  # a crash while writing the next record
    journal.path.write_bytes(bytes(raw))
    again = Journal(tmp_path / "staging")
    assert [s["name"] for s in again.steps()] == ["a"]
    again.add({"op": "unmount", "path": "/x"})
    assert [s["op"] for s in Journal(tmp_path / "staging").steps()] == ["unfreeze", "unmount"]


def test_a_dead_runs_borg_is_ended_and_reaped_before_anything_is_released(
    tmp_path: Path,
) -> None:
    """A borg orphaned by a killed run holds its repository lock until it is reaped (a
    zombie counts as alive for borg's stale-lock check): the undo kills it, waits until it
    is gone, and only then releases the instances."""
    q, incus, journal = quiescer(tmp_path, broken=set())
    parent = subprocess.Popen(
        ["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    orphan = int(parent.stdout.readline())
    freeze_steps(journal, ["a"])
    q.watch_borg(orphan)
    parent.kill()  # the run dies; its child lives on, reparented
    parent.wait()
    seen_alive_at_unfreeze: list[bool] = []
    change_state = incus.change_state

    def unfreeze(project: str, name: str, action: str) -> None:
        seen_alive_at_unfreeze.append(processes.start_time(orphan) is not None)
        change_state(project, name, action)

    incus.change_state = unfreeze  # type: ignore[method-assign]
    assert q.undo_all(Warnings()) == []
    assert processes.start_time(orphan) is None and seen_alive_at_unfreeze == [False]
    assert journal.steps() == []


def test_a_reused_pid_is_never_killed(tmp_path: Path) -> None:
    q, _, journal = quiescer(tmp_path, broken=set())
    other = subprocess.Popen(["sleep", "300"])
    try:
        started = processes.start_time(other.pid)
        assert started is not None
        journal.add({"op": "end_borg", "pid": other.pid, "started": started - 1})
        assert q.undo_all(Warnings()) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_zombie_keeper_does_not_block_the_undo(tmp_path: Path) -> None:
    """A gate keeper that has ended but is not reaped yet (its parent is slow to wait for
    it) holds no lock and no gate: the undo goes on at once, without waiting or failing."""
    q, incus, journal = quiescer(tmp_path, broken=set())
    # The keeper's parent, a `sleep` in the end, never waits for it.
    argv = ["sh", "-c", "sleep 0.2 & echo $!; exec sleep 300"]
    parent = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    keeper = int(parent.stdout.readline())
    started = processes.start_time(keeper)
    freeze_steps(journal, ["a"])
    journal.add({"op": "end_keeper", "pid": keeper, "started": started})
    try:
        while processes.running(keeper, started):
            time.sleep(0.01)
        began = time.monotonic()
        assert q.undo_all(Warnings()) == []
        assert time.monotonic() - began < 5 and incus.unfrozen == ["a"]
    finally:
        parent.kill()
        parent.wait()
