"""The run lock and the journal of quiesce steps still to undo.

Each step is written (and fsynced) before the action it undoes is taken, so a run that dies
at any point leaves a journal from which the next run undoes everything. The journal is an
append-only log of JSON lines in a file whose space is reserved when a run begins, so that
it can still be written when the disk holding it is full; a line torn by a crash is ignored
(its action was never taken).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError

Step = dict[str, Any]
RESERVE = 4 << 20  # bytes reserved for one run's journal (about 30,000 records)


@dataclass
class Journal:
    """The journal file beside the staging directory, and its lock."""

    staging_dir: Path
    _offset: int = 0
    _next_id: int = 0
    lock_fd: int = -1  # the run lock's descriptor, while it is held
    _lock: threading.Lock = field(default_factory=threading.Lock)

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
                keepers = [s for s in self.steps() if s["op"] == "end_keeper"]
                if any(str(s["pid"]) == holder for s in keepers):
                    raise UserError(
                        f"the gate keeper (pid {holder}) of a hook-mode backup holds "
                        f"{self.lock_path}: once its backup program is done, run "
                        "`incus-borg hook post`"
                    ) from None
                raise UserError(
                    f"another incus-borg run (pid {holder}) holds {self.lock_path}: "
                    "wait for it to finish"
                ) from None
            self.lock_fd = fd
            self.claim_lock()
            yield
        finally:
            self.lock_fd = -1
            os.close(fd)

    def claim_lock(self) -> None:
        """Write this process's pid into the held lock (a process that inherited it, such as
        the gate keeper, holds it from then on)."""
        os.ftruncate(self.lock_fd, 0)
        os.pwrite(self.lock_fd, f"{os.getpid()}\n".encode(), 0)

    def follow(self) -> None:
        """Continue after whatever another process appended since (the gate keeper)."""
        with self._lock:
            self._offset = 0

    # --- reading -----------------------------------------------------------------------

    def read(self) -> dict[str, Any] | None:
        """What the journal says: kind, run, pid, started, phase and the steps still to undo
        (oldest first); None when there is no journal."""
        try:
            raw = _used_part(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UserError(f"cannot read the journal {self.path}: {exc.strerror}") from None
        return _parse(raw)[0]

    def steps(self) -> list[Step]:
        """The steps still to undo, oldest first."""
        data = self.read()
        return list(data["steps"]) if data else []

    # --- writing -----------------------------------------------------------------------

    def begin(self, kind: str, run: str) -> None:
        """Start a journal for a run of `kind` ("backup" or "hook"), reserving its space."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, RESERVE)
            head = {"kind": kind, "run": run, "pid": os.getpid(), "started": time.time()}
            line = json.dumps({"begin": head}).encode() + b"\n"
            os.pwrite(fd, line, 0)
            os.fsync(fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UserError(
                f"cannot write the journal {self.path}: {exc.strerror}; free space there"
            ) from None
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self._offset, self._next_id = len(line), 0

    def add(self, *steps: Step) -> None:
        """Record steps to undo, before taking their actions (each gets an id)."""
        with self._lock:
            if self._offset == 0:  # a journal left by an earlier run: continue after its end
                self._resume()
            for step in steps:
                step["id"] = self._next_id
                self._next_id += 1
            self._append({"add": list(steps)})

    def remove(self, *steps: Step) -> None:
        """Forget steps once they are undone."""
        with self._lock:
            self._append({"done": [step["id"] for step in steps]})

    def mark(self, phase: str) -> None:
        """Record that the run reached a phase (such as "ready" at the end of `hook pre`)."""
        with self._lock:
            self._append({"phase": phase})

    def clear(self) -> None:
        """Delete the journal: nothing is left to undo."""
        self.path.unlink(missing_ok=True)

    def _append(self, record: dict[str, Any]) -> None:
        if self._offset == 0:  # a journal left by an earlier run: continue after its end
            self._resume()
        line = json.dumps(record).encode() + b"\n"
        if self._offset and _last_byte(self.path, self._offset) != b"\n":
            line = b"\n" + line  # after the unterminated line of an earlier version
        if self._offset + len(line) > RESERVE:
            raise UserError(f"the journal {self.path} is full: this run holds too much at once")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, line, self._offset)
            os.fsync(fd)
        except OSError as exc:
            raise UserError(f"cannot write the journal {self.path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        self._offset += len(line)

    def _resume(self) -> None:
        """Continue after the end of a log an earlier run left."""
        _, self._offset, self._next_id = _parse(_used_part(self.path))


def _used_part(path: Path) -> bytes:
    """The journal up to the end of its log (its reserved space is zeros)."""
    parts = []
    with path.open("rb") as f:
        while block := f.read(1 << 16):
            end = block.find(b"\0")
            parts.append(block if end < 0 else block[:end])
            if end >= 0:
                break
    return b"".join(parts)


def _last_byte(path: Path, offset: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset - 1)
        return f.read(1)


def _parse(raw: bytes) -> tuple[dict[str, Any], int, int]:
    """The journal's state, where its log ends, and the next free step id."""
    state: dict[str, Any] = {"steps": []}
    pending: dict[int, Step] = {}
    end = next_id = 0
    for line in raw.split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            break  # the end of the log, or a line torn by a crash
        end += len(line) + 1
        if "steps" in record:  # the whole-file journal of earlier versions
            state.update(record)
            record = {"add": [{**s, "id": i} for i, s in enumerate(record["steps"])]}
        if "begin" in record:
            state.update(record["begin"])
        elif "add" in record:
            pending.update((step["id"], step) for step in record["add"])
            next_id = max([next_id, *(step["id"] + 1 for step in record["add"])])
        elif "done" in record:
            done = record["done"]
            for key in done if isinstance(done, list) else [done]:
                pending.pop(key, None)
        elif "phase" in record:
            state["phase"] = record["phase"]
    state["steps"] = [pending[key] for key in sorted(pending)]
    return state, min(end, len(raw.split(b"\0", 1)[0]) + 1), next_id
