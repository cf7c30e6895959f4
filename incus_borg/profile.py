"""Where a command spends its time (`incus-borg --profile`): the wall time and the CPU time of
each phase, incus-borg's own and that of the programs it waited for (borg, the incus client).

One profile per process: a command is one process, and its phases lie in many modules. A
phase begun inside another is shown below it, indented; phases that run side by side (a
background thread, several borgs) each count their whole wall time, and share the CPU
measured while they overlap.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TextIO, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class Phase:
    """One phase's totals over all the times it ran."""

    order: tuple[int, ...]  # where it is shown: below its parent, in the order first run
    calls: int = 0
    wall: float = 0.0
    cpu: float = 0.0  # incus-borg's own (every thread)
    children: float = 0.0  # the processes it waited for while the phase ran


@dataclass
class Profile:
    """The phases of this process, each under the phase it ran in (its path)."""

    phases: dict[tuple[str, ...], Phase] = field(default_factory=dict)
    enabled: bool = False  # print the table when the command ends (--profile)
    _local: threading.local = field(default_factory=threading.local)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall and CPU time the block takes to phase `name`, below the phase this
        thread is in."""
        parent: tuple[str, ...] = getattr(self._local, "path", ())
        path = (*parent, name)
        with self._lock:
            entry = self.phases.get(path)
            if entry is None:
                above = self.phases[parent].order if parent in self.phases else ()
                entry = self.phases[path] = Phase((*above, len(self.phases)))
        wall, cpu, children = time.monotonic(), time.process_time(), _children_cpu()
        self._local.path = path
        try:
            yield
        finally:
            self._local.path = parent
            with self._lock:
                entry.calls += 1
                entry.wall += time.monotonic() - wall
                entry.cpu += time.process_time() - cpu
                entry.children += _children_cpu() - children

    def carried(self, action: Callable[P, R]) -> Callable[P, R]:
        """`action`, to run in another thread below the phase this thread is in now."""
        path: tuple[str, ...] = getattr(self._local, "path", ())

        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            self._local.path = path
            return action(*args, **kwargs)

        return run

    def rows(self) -> list[tuple[tuple[str, ...], Phase]]:
        """The phases, each right after the phase it ran in."""
        return sorted(self.phases.items(), key=lambda row: row[1].order)

    def as_dict(self) -> dict[str, dict[str, float]]:
        """The phases as JSON-ready figures, by their path ("read/quiesce")."""
        return {
            "/".join(path): {
                "calls": p.calls,
                "wall": round(p.wall, 4),
                "cpu": round(p.cpu, 4),
                "children_cpu": round(p.children, 4),
            }
            for path, p in self.rows()
        }

    def print(self, stream: TextIO) -> None:
        """Print the table; a profile that cannot be made says why, and the command's own
        outcome stands."""
        try:
            print(self.table(), file=stream)
        except (OSError, ValueError, IndexError) as exc:
            print(f"incus-borg: no profile: {exc}", file=stream)

    def table(self) -> str:
        """The profile as a table, with the whole command's figures last."""
        total = Phase((), 1, process_age(), time.process_time(), _children_cpu())
        rows = [(f"{'  ' * (len(path) - 1)}{path[-1]}", p) for path, p in self.rows()]
        rows.append(("total (from start)", total))
        width = max(len(label) for label, _ in rows)
        head = f"{'phase':<{width}}  calls   wall s    cpu s  child cpu s"
        lines = [head, "-" * len(head)]
        for label, p in rows:
            figures = f"{p.calls:>5}  {p.wall:>7.3f}  {p.cpu:>7.3f}  {p.children:>11.3f}"
            lines.append(f"{label:<{width}}  {figures}")
        return "\n".join(lines)


def process_age() -> float:
    """Seconds since this process started (its interpreter's start-up included)."""
    ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    """User and system CPU of every child process reaped so far."""
    times = os.times()
    return times.children_user + times.children_system


PROFILE = Profile()


def phase(name: str) -> AbstractContextManager[None]:
    """Time a block as phase `name` of this process's profile."""
    return PROFILE.phase(name)


def carried(action: Callable[P, R]) -> Callable[P, R]:
    """`action`, to run in another thread below the current phase of this process's profile."""
    return PROFILE.carried(action)
