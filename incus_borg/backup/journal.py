"""The run lock and the journal of quiesce steps still to undo.

Each step is written (and fsynced) before the action it undoes is taken, so a run that
dies at any point leaves a journal from which the next run restores everything.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError

Step = dict[str, Any]


@dataclass
class Journal:
    """The journal file beside the staging directory, and its lock."""

    staging_dir: Path

    @property
    def path(self) -> Path:
        """The journal file."""
        return self.staging_dir.with_name(self.staging_dir.name + ".journal")

    @property
    def lock_path(self) -> Path:
        """The lock file: held with flock for as long as a run works."""
        return self.staging_dir.with_name(self.staging_dir.name + ".lock")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run lock, or fail at once naming the run that holds it."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                raise UserError(
                    f"another incus-borg run (pid {holder}) holds {self.lock_path}: "
                    "wait for it to finish"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def read(self) -> dict[str, Any] | None:
        """The journal's content, or None when there is nothing to undo."""
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(
                f"cannot read the journal {self.path}: {exc}; check it by hand"
            ) from None
        return data

    def steps(self) -> list[Step]:
        """The steps still to undo, oldest first."""
        data = self.read()
        return list(data["steps"]) if data else []

    def begin(self, kind: str, run: str) -> None:
        """Start a journal for a run of `kind` ("backup" or "hook")."""
        self._write(
            {"kind": kind, "run": run, "pid": os.getpid(), "started": time.time(), "steps": []}
        )

    def add(self, step: Step) -> None:
        """Record a step to undo, before taking the action."""
        data = self.read() or {"kind": "backup", "run": "", "pid": os.getpid(), "steps": []}
        data["steps"].append(step)
        self._write(data)

    def remove(self, step: Step) -> None:
        """Forget a step once it is undone."""
        data = self.read()
        if data is None:
            return
        data["steps"] = [s for s in data["steps"] if s != step]
        self._write(data)

    def clear(self) -> None:
        """Delete the journal: nothing is left to undo."""
        self.path.unlink(missing_ok=True)

    def _write(self, data: dict[str, Any]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
