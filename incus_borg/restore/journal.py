"""The restore journal: what a restore under way is about to create or move, written (and
fsynced) before it acts, so that the command after a killed restore knows what is whose.

It is a directory beside the staging directory (`<staging>.restore-journal`) holding one
JSON file per restore under way: `server.json`, `instance@<project>@<name>.json`. A file is
removed when its restore finished or was undone.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UserError

Entry = dict[str, Any]
SERVER = "server"


def instance_key(project: str, name: str) -> str:
    """The journal key of a restore of instance `project/name`."""
    return f"instance@{project}@{name}"


@dataclass(frozen=True)
class RestoreJournal:
    """The journal directory of one configuration."""

    directory: Path

    @classmethod
    def of(cls, config: Config) -> RestoreJournal:
        """The journal beside the configured staging directory."""
        staging = Path(config.staging_dir)
        return cls(staging.with_name(staging.name + ".restore-journal"))

    def path(self, key: str) -> Path:
        """The file holding one entry."""
        return self.directory / f"{key}.json"

    def read(self, key: str) -> Entry | None:
        """One entry, or None when that restore is not under way."""
        try:
            data: Entry = json.loads(self.path(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise UserError(
                f"cannot read the restore journal {self.path(key)}: {exc}; check it by hand"
            ) from None
        return data

    def entries(self, prefix: str) -> dict[str, Entry]:
        """Every entry whose key starts with `prefix`, by key."""
        if not self.directory.is_dir():
            return {}
        keys = sorted(p.stem for p in self.directory.glob(f"{prefix}*.json"))
        return {key: entry for key in keys if (entry := self.read(key)) is not None}

    def record(self, key: str, entry: Entry) -> None:
        """Write one entry durably (the file and its directory fsynced) before acting."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        entry = {"pid": os.getpid(), "recorded": time.time(), **entry}
        tmp = self.directory / f".{key}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(key))
        self._sync_directory()

    def clear(self, key: str) -> None:
        """Forget one entry: that restore finished or was undone."""
        self.path(key).unlink(missing_ok=True)
        if self.directory.is_dir():
            self._sync_directory()

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def alive(entry: Entry) -> bool:
    """Whether the incus-borg process that wrote `entry` still runs."""
    try:
        args = Path(f"/proc/{int(entry['pid'])}/cmdline").read_bytes().split(b"\0")
    except (OSError, KeyError, ValueError):
        return False
    mine = int(entry["pid"]) == os.getpid()
    return not mine and any(b"incus_borg" in a or b"incus-borg" in a for a in args)


def when(timestamp: float) -> str:
    """A time for messages (local, to the second)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
