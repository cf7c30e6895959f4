"""Ending an instance's commands and running its post: what is reported, what stays
journalled, and that a post run in the background is waited for before the undo."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from incus_borg.backup import commands
from incus_borg.backup.journal import Journal
from incus_borg.backup.quiesce import Quiescer, describe
from incus_borg.config import IncusSettings
from incus_borg.errors import UserError, Warnings


class FakeIncus:
    """An instance that runs commands: `codes` are the exit codes of the commands that are
    not the kill script, in order (None: still running at the timeout)."""

    def __init__(self, status: str = "Running", codes: list[int | None] | None = None) -> None:
        self.status = status
        self.codes = list(codes or [0])
        self.ran: list[list[str]] = []
        self.up = True
        self.gate = threading.Event()
        self.gate.set()

    def instance_status(self, project: str, name: str) -> str:
        if not self.up:
            raise UserError("Incus is not reachable")
        return self.status

    def settle(self, kind: str, project: str, name: str) -> None:
        """Nothing is under way (and nothing answers while Incus is down)."""
        if not self.up:
            raise UserError("Incus is not reachable")

    def reachable(self) -> bool:
        return self.up

    def exec_start(self, project: str, name: str, argv: list[str], env: dict[str, str]) -> str:
        self.ran.append(argv)
        return str(len(self.ran))

    def exec_wait(self, project: str, name: str, op: str, timeout: float) -> Any:
        self.gate.wait()
        argv = self.ran[int(op) - 1]
        if argv[2] == commands.KILL_SCRIPT:
            return 0, ""
        code = self.codes.pop(0) if self.codes else 0
        return None if code is None else (code, "line one\nline two\n")


def quiescer(tmp_path: Path, incus: FakeIncus) -> tuple[Quiescer, Warnings, list[str]]:
    journal = Journal(tmp_path / "staging")
    journal.begin("backup", "run")
    warnings, said = Warnings(), list[str]()
    q = Quiescer(incus, IncusSettings(), journal, warnings, said.append)  # type: ignore[arg-type]
    return q, warnings, said


def test_post_runs_after_what_is_left_is_ended(tmp_path: Path) -> None:
    incus = FakeIncus(codes=[0])
    q, warnings, said = quiescer(tmp_path, incus)
    step = q.guard("default", "c1", "touch /x", 5)
    outcome = q.release(step)
    assert outcome is not None and outcome.exit_code == 0
    assert [argv[2] for argv in incus.ran] == [commands.KILL_SCRIPT, "exec >/dev/null\ntouch /x"]
    assert said == [f"instance default/c1: post command ran in {outcome.duration:.1f} s"]
    assert not warnings.messages and not q.journal.steps()


def test_failing_post_is_a_warning_and_is_not_run_again(tmp_path: Path) -> None:
    q, warnings, _ = quiescer(tmp_path, FakeIncus(codes=[4]))
    q.release(q.guard("default", "c1", "false", 5))
    assert warnings.messages == [
        "instance default/c1: its post command exited 4: line one / line two"
    ]
    assert not q.journal.steps()


def test_timed_out_command_is_killed(tmp_path: Path) -> None:
    incus = FakeIncus(codes=[None, None])
    outcome = commands.run(incus, "default", "c1", "sleep 9", 1, "tok")  # type: ignore[arg-type]
    assert outcome.exit_code is None and not outcome.ok
    assert outcome.problem == "timed out after 1 s (user.incus-borg.timeout) and was killed"
    assert incus.ran[1][2:] == [commands.KILL_SCRIPT, "sh", "tok"]


@pytest.mark.parametrize("status", ["Stopped", "Frozen"])
def test_post_of_an_instance_that_does_not_run_is_not_run(tmp_path: Path, status: str) -> None:
    incus = FakeIncus(status=status)
    q, warnings, _ = quiescer(tmp_path, incus)
    assert q.release(q.guard("default", "c1", "touch /x", 5)) is None
    assert incus.ran == []
    assert warnings.messages == [
        f"instance default/c1 is {status.lower()}: its post command was not run"
    ]


def test_unreachable_incus_keeps_the_step_for_the_next_run(tmp_path: Path) -> None:
    incus = FakeIncus()
    q, warnings, _ = quiescer(tmp_path, incus)
    step = q.guard("default", "c1", "touch /x", 5)
    incus.up = False
    assert q.undo_all(warnings) == [describe(step)]
    assert [s["op"] for s in q.journal.steps()] == ["run_post"]
    incus.up = True
    assert q.undo_all(warnings) == [] and incus.ran


def test_undo_waits_for_a_post_running_in_the_background(tmp_path: Path) -> None:
    incus = FakeIncus(codes=[0])
    q, warnings, _ = quiescer(tmp_path, incus)
    step = q.guard("default", "c1", "touch /x", 5)
    incus.gate.clear()
    done: list[Any] = []
    q.release_later(step, done.append)
    threading.Timer(0.2, incus.gate.set).start()
    assert q.undo_all(warnings) == []
    assert len(done) == 1 and done[0].exit_code == 0
    assert len([a for a in incus.ran if a[2] != commands.KILL_SCRIPT]) == 1  # post ran once
