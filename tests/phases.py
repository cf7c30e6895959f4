"""Reaching a phase of incus-borg's work by its pause points (`incus_borg.host.testpoints`):
started with INCUS_BORG_TEST_PAUSE_AT=PHASE[:TARGET], incus-borg stops itself (SIGSTOP) when
it gets there, with everything the phase holds still held. The test then kills it, signals
it, or changes something behind its back, and lets it go on. Nothing here waits for a
moment by timing: a stopped process stays stopped until it is told otherwise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from incus_borg.backup.journal import Journal
from incus_borg.host.testpoints import ENV, PHASES

TIMEOUT = 300  # seconds a phase may take to be reached, generous for a loaded machine


def journal_steps(staging: Path) -> list[dict[str, Any]]:
    """The steps a run's journal still holds (none when there is no journal)."""
    try:
        return Journal(staging).steps()
    except Exception:
        return []


def command(config: Path, *args: str) -> list[str]:
    """The argv of `incus-borg -c CONFIG ARGS...`."""
    return [sys.executable, "-m", "incus_borg", "-c", str(config), *args]


def stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (by a signal: state T)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "T"


def pause_env(phase: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an incus-borg that stops itself at `phase` (PHASE[:TARGET])."""
    assert phase.partition(":")[0] in PHASES, phase
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BORG_", "INCUS_BORG"))}
    return {**clean, **(extra or {}), ENV: phase}


def wait_paused(proc: subprocess.Popen[Any], phase: str, timeout: float = TIMEOUT) -> None:
    """Wait until `proc` stopped itself at its pause point; fail when it ended first."""
    deadline = time.monotonic() + timeout
    while not stopped(proc.pid):
        if proc.poll() is not None:
            told = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(
                f"incus-borg ended (exit {proc.returncode}) before {phase}: {told}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"incus-borg did not reach {phase} within {timeout:.0f} s")
        time.sleep(0.02)


@contextmanager
def paused(
    argv: Sequence[str], phase: str, env: Mapping[str, str] | None = None, **popen: Any
) -> Iterator[subprocess.Popen[str]]:
    """Start `argv` and give it to the block once it stopped itself at `phase`. Whatever the
    block does (kill it, signal it, let it go on), the process never stays stopped: when the
    block leaves it stopped or fails, it goes on and undoes what it did on its own."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.PIPE)
    proc = subprocess.Popen(argv, env=pause_env(phase, env), text=True, **popen)
    try:
        wait_paused(proc, phase)
        yield proc
    finally:
        if proc.poll() is None and stopped(proc.pid):
            resume(proc)


def resume(proc: subprocess.Popen[Any]) -> None:
    """Let a paused incus-borg go on."""
    os.kill(proc.pid, signal.SIGCONT)


def signal_and_resume(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    """Deliver `sig` to a paused incus-borg: it is handled as soon as it goes on."""
    os.kill(proc.pid, sig)
    resume(proc)


def kill_9(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL (a stopped process too) and reap it."""
    proc.kill()
    proc.wait()
