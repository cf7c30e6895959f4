"""A process named by pid and start time, so that a pid reused by another process is never
mistaken for it: how a run's journal names the borgs it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from . import signals

GONE_WAIT = 10.0  # seconds to wait for a killed process to be reaped


def _stat(pid: int) -> list[bytes]:
    """The fields of /proc/PID/stat after the command name (field 3, the state, first);
    empty when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return []
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    return stat[stat.rindex(b")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), or None when there is no such process."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


def end(
    pid: int,
    started: int | None,
    wait: float = GONE_WAIT,
    graceful: float | None = None,
    reaped: bool = True,
) -> bool:
    """Kill the process `pid` that started at `started` and wait until it is gone, reaped
    too unless `reaped` is false: until then it still counts as alive (a borg's repository
    lock stays held). With `graceful`, it is first asked to end (SIGTERM) and given that
    many seconds. Returns whether it is gone; a process of another start time is left alone
    (it is gone)."""
    there = alive if reaped else running
    if graceful is not None and _signal_and_wait(pid, started, signal.SIGTERM, graceful, there):
        return True
    return _signal_and_wait(pid, started, signal.SIGKILL, wait, there)


def alive(pid: int, started: int | None) -> bool:
    """Whether the process `pid` that started at `started` is still there."""
    return started is not None and start_time(pid) == started


def running(pid: int, started: int | None) -> bool:
    """Whether that process is alive and not a zombie waiting to be reaped."""
    return alive(pid, started) and _stat(pid)[:1] != [b"Z"]


def parent(pid: int) -> int:
    """The parent of `pid` (0 when there is no such process)."""
    fields = _stat(pid)
    return int(fields[1]) if fields else 0


def cmdline(pid: int) -> list[str]:
    """The argv of `pid` (empty when there is no such process, or it is a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(arg) for arg in raw.split(b"\0")[:-1]]


def _signal_and_wait(
    pid: int, started: int | None, sig: int, wait: float, there: Callable[[int, int | None], bool]
) -> bool:
    if not there(pid, started):
        return True
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + wait
    while there(pid, started):
        with contextlib.suppress(ChildProcessError):  # another's: its parent or init reaps it
            os.waitpid(pid, os.WNOHANG)  # a child of this process is reaped here
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def run_to_end(
    argv: list[str], stdin: IO[bytes] | None, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[bytes]:
    """`subprocess.run(argv)` with its output captured, started whole: an interrupt that
    comes while the child starts is held back until it is known (and then kills it), so
    that no child outlives the run holding a pipe open. Raises subprocess.TimeoutExpired."""
    with signals.deferred():
        proc = subprocess.Popen(
            argv,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
    with proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def stop(proc: subprocess.Popen[bytes], wait: float = GONE_WAIT) -> int:
    """End a child whose reader gave up: SIGTERM (borg then lets its lock go), SIGKILL when
    it is still there after `wait` seconds. Returns its exit code."""
    proc.terminate()
    try:
        return proc.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
