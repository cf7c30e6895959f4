"""Checks of configuration values that would otherwise fail only once a run has begun.

`config validate`, `backup` and `hook pre` run them before anything is quiesced: a bad run
name, a relative path, a staging directory that overlaps a repository or the Incus
directory, or one that cannot be written, is refused with one line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from . import layout
from .config import Config, Retention
from .errors import UserError

DEFAULT_FORMAT = Config().archive_name_format


def check(config: Config, source: Path | str | None = None) -> None:
    """Refuse (UserError, exit 2) the first problem found; `source` names the file."""
    problem = first_problem(config)
    if problem:
        where = f"config {source}" if source else "config"
        raise UserError(f"{where}: {problem}")


def first_problem(config: Config) -> str | None:
    """The first value of `config` that a run would trip over, as "'key' ...: fix"."""
    name = layout.name_format_problem(config.archive_name_format)
    if name:
        return f"'archive_name_format' {name}: use e.g. {DEFAULT_FORMAT!r}"
    for problem in (
        *(_path_problem(key, value) for key, value in _paths(config)),
        *(retention_problem(key, r) for key, r in _retentions(config)),
        _overlap_problem(config),
        _unwritable_problem(Path(config.staging_dir)),
    ):
        if problem:
            return problem
    return None


def local_repositories(config: Config) -> list[tuple[str, Path]]:
    """(key, path) of every repository on this host (not ssh:// or host:path)."""
    found = []
    for i, repo in enumerate(config.repositories):
        path = repo.path.removeprefix("file://")
        # ssh://..., and Borg's scp-style [user@]host:path, are remote.
        if path == repo.path and ":" in path.split("/")[0]:
            continue
        found.append((f"repositories[{i}].path", Path(path)))
    return found


def _paths(config: Config) -> list[tuple[str, str]]:
    incus = config.incus
    return [
        *((key, str(path)) for key, path in local_repositories(config)),
        ("staging_dir", config.staging_dir),
        ("incus.dir", incus.dir),
        ("incus.subuid", incus.subuid),
        ("incus.subgid", incus.subgid),
    ]


def _path_problem(key: str, value: str) -> str | None:
    if not value.strip():
        return f"'{key}' is empty: give an absolute path"
    if not os.path.isabs(value):
        return (
            f"'{key}' is the relative path {value!r}, which would depend on the current "
            "directory: give an absolute path"
        )
    return None


def _retentions(config: Config) -> list[tuple[str, Retention]]:
    own = [
        (f"repositories[{i}].retention", r.retention)
        for i, r in enumerate(config.repositories)
        if r.retention is not None
    ]
    return [("retention", config.retention), *own]


def retention_problem(key: str, retention: Retention) -> str | None:
    """What is wrong with a retention policy (`key` names it), or None."""
    counts = dataclasses.asdict(retention)
    negative = [k for k, v in counts.items() if v < 0]
    if negative:
        return f"'{key}.{negative[0]}' is negative: give 0 or more"
    if not any(counts.values()):
        return f"'{key}' keeps nothing, so `prune` would delete every run: keep at least one"
    return None


def _overlap_problem(config: Config) -> str | None:
    """Staging is emptied by every run: it may not hold, or lie in, what must be kept."""
    staging = Path(os.path.realpath(config.staging_dir))
    kept = [*local_repositories(config), ("incus.dir", Path(config.incus.dir))]
    for key, path in kept:
        real = Path(os.path.realpath(path))
        if staging == real:
            relation = "is"
        elif staging.is_relative_to(real):
            relation = "lies inside"
        elif real.is_relative_to(staging):
            relation = "contains"
        else:
            continue
        return (
            f"'staging_dir' {staging} {relation} '{key}' {real}, and staging is emptied by "
            "every run: choose a staging_dir apart from the repositories and the Incus directory"
        )
    return None


def _unwritable_problem(staging: Path) -> str | None:
    """Why staging (and the lock and journal beside it) could not be written, or None."""
    for place in (staging.parent, staging):
        existing = next(p for p in (place, *place.parents) if os.path.exists(p))
        why = None
        if not existing.is_dir():
            why = "is not a directory"
        elif os.statvfs(existing).f_flag & os.ST_RDONLY:
            why = "is on a read-only filesystem"
        elif not os.access(existing, os.W_OK | os.X_OK):
            why = "is not writable"
        if why:
            where = "" if existing == staging else f": {existing}"
            return (
                f"'staging_dir' {staging}{where} {why}: choose a staging_dir on a writable "
                "filesystem"
            )
    return None
