"""The local index of what each run holds, so that `status`, the metrics and the report never
need to call borg.

It is written at the end of every `backup` and hook-mode run, kept in step by `prune`, and
rebuilt from the repositories by `status --refresh` (one `borg list` per repository, and one
manifest read per run it does not know yet). It lives beside the staging directory
(`<staging_dir>.index.json`, 0600), and is replaced atomically under its own lock
(`<staging_dir>.index.lock`), so a reader never sees half of it.

A hook-mode run is recorded by `hook post` before the repositories that hold it are known
(the other program chose them and the archive's name): it is *unattributed* until a refresh
finds it in a repository.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..manifest import Group, Item, Manifest

FORMAT = 1


@dataclass
class Entry:
    """One instance or custom volume as a run recorded it."""

    kind: str  # "instance" or "volume"
    project: str
    name: str
    pool: str
    window: float | None = None  # seconds it was quiesced (None in hook mode)
    changed_files: int | None = None
    failed: str | None = None  # why the run left it out
    reader: str = "in place"  # "in place" or "export" (see backup/plan.py)
    group: str | None = None  # its consistency group

    @property
    def key(self) -> tuple[str, str]:
        """(kind, ref): what identifies it across runs."""
        return self.kind, ref(self.kind, self.project, self.name, self.pool)

    @classmethod
    def of(cls, item: Item) -> Entry:
        """The record of a manifest item."""
        return cls(
            item.kind,
            item.project,
            item.name,
            item.pool,
            item.window,
            item.changed_files,
            item.failed,
            item.reader,
            item.group,
        )


def ref(kind: str, project: str, name: str, pool: str) -> str:
    """How an instance (project/name) or a custom volume (pool/project/name) is named."""
    return f"{project}/{name}" if kind == "instance" else f"{pool}/{project}/{name}"


@dataclass
class Stored:
    """A run's archive in one repository, with what its `borg create` reported."""

    archive: str
    bytes_read: int | None = None
    added: int | None = None  # deduplicated bytes the run added
    files: int | None = None
    size: int | None = None  # the repository's deduplicated size once the run was stored


@dataclass
class Run:
    """What one run holds, and where."""

    run: str
    member: str
    hostname: str
    created: str  # ISO 8601, when the run began
    mode: str
    hook_mode: bool
    partial: bool
    daemon_downtime: float | None
    items: list[Entry] = field(default_factory=list)
    repositories: dict[str, Stored] = field(default_factory=dict)
    attributed: bool = True  # False: a hook-mode run not yet found in any repository
    finished: float | None = None  # epoch seconds when it was stored (None: not known)
    groups: list[Group] = field(default_factory=list)  # its consistency groups

    @property
    def time(self) -> float:
        """When the run was stored (epoch seconds), else when it began."""
        if self.finished is not None:
            return self.finished
        return datetime.fromisoformat(self.created).timestamp()

    def held_in(self, repository: str) -> bool:
        """Whether `repository` holds this run (an unattributed run counts for every one)."""
        return not self.attributed or repository in self.repositories

    @classmethod
    def of(cls, manifest: Manifest, finished: float | None, attributed: bool = True) -> Run:
        """The record of a run's manifest."""
        return cls(
            run=manifest.run,
            member=getattr(manifest, "member", None) or manifest.hostname,
            hostname=manifest.hostname,
            created=manifest.created,
            mode=manifest.mode,
            hook_mode=manifest.hook_mode,
            partial=manifest.partial,
            daemon_downtime=manifest.daemon_downtime,
            items=[Entry.of(item) for item in manifest.instances + manifest.volumes],
            attributed=attributed,
            finished=finished,
            groups=list(manifest.groups),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Run:
        """A run as the index file holds it."""
        data = dict(data)
        data["items"] = [Entry(**e) for e in data.get("items", [])]
        data["repositories"] = {k: Stored(**v) for k, v in data.get("repositories", {}).items()}
        data["groups"] = [Group(**g) for g in data.get("groups", [])]
        return cls(**data)


@dataclass
class Ending:
    """How a command last ended."""

    exit_code: int
    finished: float  # epoch seconds
    duration: float  # seconds


@dataclass
class Index:
    """Every run known to this host, archives known to hold no run, and how each command
    last ended."""

    runs: dict[str, Run] = field(default_factory=dict)
    foreign: dict[str, list[str]] = field(default_factory=dict)  # repository -> archives
    commands: dict[str, Ending] = field(default_factory=dict)

    def ordered(self) -> list[Run]:
        """The runs, oldest first."""
        return sorted(self.runs.values(), key=lambda r: r.time)

    def groups(self) -> list[Group]:
        """Each consistency group as its newest run held it."""
        newest: dict[str, Group] = {}
        for run in self.ordered():
            newest |= {g.name: g for g in run.groups}
        return [newest[name] for name in sorted(newest)]

    def add(self, run: Run) -> None:
        """Record a run; a run known already (found again, or in another repository) keeps
        its record and gains the new repositories."""
        known = self.runs.setdefault(run.run, run)
        for repository, stored in run.repositories.items():
            known.repositories.setdefault(repository, stored)
        known.attributed = known.attributed or run.attributed

    def archives(self, repository: str) -> set[str]:
        """The archives of `repository` the index knows (runs, and foreign archives)."""
        held = {
            r.repositories[repository].archive
            for r in self.runs.values()
            if repository in r.repositories
        }
        return held | set(self.foreign.get(repository, []))

    def forget(self, repository: str, archives: set[str]) -> None:
        """`repository` no longer holds these archives: a run held nowhere any more is
        dropped."""
        for name, run in list(self.runs.items()):
            stored = run.repositories.get(repository)
            if stored is not None and stored.archive in archives:
                del run.repositories[repository]
                if not run.repositories and run.attributed:
                    del self.runs[name]
        kept = [a for a in self.foreign.get(repository, []) if a not in archives]
        self.foreign[repository] = kept

    def to_json(self) -> str:
        """The index file's content."""
        data = {"format": FORMAT, **dataclasses.asdict(self)}
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Index:
        """Read an index file."""
        data = json.loads(text)
        return cls(
            runs={k: Run.from_dict(v) for k, v in data.get("runs", {}).items()},
            foreign={k: list(v) for k, v in data.get("foreign", {}).items()},
            commands={k: Ending(**v) for k, v in data.get("commands", {}).items()},
        )


class IndexFile:
    """The index file beside a staging directory."""

    def __init__(self, staging_dir: str | Path) -> None:
        staging = Path(staging_dir)
        self.path = staging.with_name(staging.name + ".index.json")
        self.lock_path = staging.with_name(staging.name + ".index.lock")

    def load(self) -> Index:
        """The index (empty when there is none yet)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return Index()
        except OSError as exc:
            raise UserError(f"cannot read the index {self.path}: {exc.strerror}") from None
        try:
            return Index.from_json(text)
        except (ValueError, TypeError, KeyError) as exc:
            raise UserError(
                f"the index {self.path} is damaged ({exc}): remove it and run "
                "`incus-borg status --refresh` to rebuild it from the repositories"
            ) from None

    @contextmanager
    def update(self) -> Iterator[Index]:
        """The index to change, under the lock; written back atomically when the block ends
        without an error."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise UserError(f"cannot lock the index {self.lock_path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            index = self.load()
            yield index
            self._write(index.to_json())
        finally:
            os.close(fd)

    def _write(self, text: str) -> None:
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.rename(temporary, self.path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise UserError(f"cannot write the index {self.path}: {exc.strerror}") from None
