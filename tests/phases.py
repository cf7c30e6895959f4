"""Catching a running incus-borg in one phase of its work, so that a test can kill it there:
the phase is found by watching its journal and the states it changes, never by sleeping."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.incusd import wait_for

from incus_borg.backup.journal import Journal


def journal_steps(staging: Path) -> list[dict[str, Any]]:
    """The steps a run's journal still holds (none when there is no journal)."""
    try:
        return Journal(staging).steps()
    except Exception:
        return []


def has_step(staging: Path, op: str) -> Callable[[], bool]:
    """Whether the journal holds a step of kind `op` (such as "unfreeze")."""
    return lambda: any(step["op"] == op for step in journal_steps(staging))


def holds(predicate: Callable[[], bool]) -> Callable[[], bool]:
    """`predicate`, false while it cannot be told (the daemon restarting, a file half-written)."""

    def safely() -> bool:
        try:
            return predicate()
        except Exception:
            return False

    return safely


def stop_in_phase(
    proc: subprocess.Popen[Any],
    reached: Callable[[], bool],
    settled: Callable[[], bool],
    timeout: float = 120,
) -> None:
    """SIGSTOP `proc` once `reached()` holds and, while it is stopped, `settled()` comes true
    (an action it started has taken effect). If it does not, `proc` goes on and the phase is
    waited for again. Fails the test when `proc` ends first; a failing test never leaves
    `proc` stopped (it goes on, and undoes what it did, on its own)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                told = proc.stderr.read() if proc.stderr else ""
                raise AssertionError(
                    f"incus-borg ended (exit {proc.returncode}) before the phase: {told}"
                )
            if not holds(reached)():
                continue
            os.kill(proc.pid, signal.SIGSTOP)
            if wait_for(holds(settled), 3):
                return
            os.kill(proc.pid, signal.SIGCONT)
    except BaseException:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        raise
    raise AssertionError("incus-borg never reached the phase")


def kill_9(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL (a stopped process too) and reap it."""
    proc.kill()
    proc.wait()
