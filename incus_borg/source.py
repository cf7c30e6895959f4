"""Where a restore reads from: a run in a Borg repository, or a directory holding a staging tree.

Both give the manifest, single files, a tar stream of an item (as `incus import` takes it)
and extraction of paths into a directory.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Protocol

import yaml

from . import layout
from .borg import (
    Borg,
    export_tar_argv,
    extract_argv,
    extract_stdout_argv,
    list_argv,
    list_paths_argv,
    raise_for,
)
from .config import Repository
from .errors import UserError
from .manifest import Item, Manifest

PART_MARK = "@"  # part archives are named <run>@<kind>@...


class Source(Protocol):
    """What restore needs from a backup."""

    manifest: Manifest
    description: str

    def read(self, path: str, item: Item | None = None) -> bytes:
        """One file of the run (of the item's own archive, when given)."""

    def tar(self, item: Item) -> Any:
        """A context manager yielding a readable tar stream of the item's `backup/` tree."""

    def extract(self, item: Item | None, paths: list[str], strip: int, dest: Path) -> None:
        """Extract `paths` of the item's archive (or the run's own) into `dest`, dropping
        `strip` leading parts."""

    def has(self, item: Item) -> bool:
        """Whether the item's data is really there."""


def definitions(source: Source, kind: str) -> list[dict[str, Any]]:
    """The archived definitions of one kind (profiles, networks, projects, ...)."""
    data = yaml.safe_load(source.read(f"{layout.DEFINITIONS}/{kind}.yaml"))
    return list(data or [])


def open_source(spec: str, borg: Borg | None, repo: Repository) -> Source:
    """A directory (holding manifest.json), `latest`, or an archive name in `repo`."""
    path = Path(spec)
    if path.is_dir():
        if not (path / str(layout.MANIFEST)).is_file():
            raise UserError(f"{path} holds no {layout.MANIFEST}: point at a restored staging tree")
        return DirectorySource(path)
    if borg is None:
        raise UserError(f"{spec} is not a directory")
    return BorgSource(borg, repo, spec)


def run_archives(borg: Borg, repo: Repository) -> list[str]:
    """Names of the archives that start a run (not the per-instance parts), oldest first."""
    archives = borg.run(list_argv(repo), repo).json()["archives"]
    return [a["name"] for a in archives if PART_MARK not in a["name"]]


class DirectorySource:
    """A staging tree restored by another program (restic restore, borg extract, ...)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = str(root)
        self.manifest = Manifest.from_json(self.read(str(layout.MANIFEST)).decode())

    def read(self, path: str, item: Item | None = None) -> bytes:
        try:
            return (self.root / path).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {path} in {self.root}: {exc.strerror}") from None

    @contextmanager
    def tar(self, item: Item) -> Iterator[IO[bytes]]:
        argv = ["tar", "-C", str(self.root / item.path), "--numeric-owner", "--xattrs"]
        argv += ["--xattrs-include=*", "-cf", "-", "backup"]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            yield proc.stdout
            proc.stdout.close()
            if proc.wait() != 0:
                stderr = proc.stderr.read().decode() if proc.stderr else ""
                raise UserError(f"reading {item.path} from {self.root} failed: {stderr.strip()}")

    def extract(self, item: Item | None, paths: list[str], strip: int, dest: Path) -> None:
        for path in paths:
            source = self.root / path
            if not source.exists() and not source.is_symlink():
                raise UserError(f"{path} is not in {self.root}")
            target = dest.joinpath(*Path(path).parts[strip:])
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir() and not source.is_symlink():
                shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
                _copy_owner_tree(source, target)
            else:
                shutil.copy2(source, target, follow_symlinks=False)
                _copy_owner(source, target)

    def has(self, item: Item) -> bool:
        return (self.root / item.path / "backup" / "index.yaml").is_file()


def _copy_owner(source: Path, target: Path) -> None:
    st = source.lstat()
    os.lchown(target, st.st_uid, st.st_gid)


def _copy_owner_tree(source: Path, target: Path) -> None:
    _copy_owner(source, target)
    for entry in source.rglob("*"):
        _copy_owner(entry, target / entry.relative_to(source))


class BorgSource:
    """One run in a Borg repository: its server archive and its part archives."""

    def __init__(self, borg: Borg, repo: Repository, name: str) -> None:
        self.borg = borg
        self.repo = repo
        runs = run_archives(borg, repo)
        if name != "latest" and name not in runs:
            raise UserError(f"no archive {name!r} in repository {repo.name}: see `incus-borg list`")
        # `latest`: the newest archive holding a manifest (a shared repository holds others).
        text = ""
        for candidate in reversed(runs) if name == "latest" else [name]:
            self.archive = candidate
            text = self.read(str(layout.MANIFEST)).decode()
            if text.strip():
                break
        if not text.strip():
            what = "no incus-borg run yet" if name == "latest" else f"no incus-borg run in {name!r}"
            raise UserError(f"repository {repo.name} holds {what}")
        self.description = f"{repo.name}::{self.archive}"
        self.manifest = Manifest.from_json(text)

    def _archive_of(self, item: Item | None) -> str:
        return (item.archive if item else None) or self.archive

    def read(self, path: str, item: Item | None = None) -> bytes:
        archive = self._archive_of(item)
        if archive == self.archive and path.startswith(f"{layout.DEFINITIONS}/"):
            return self._definitions.get(path, b"")
        return self.borg.run(
            extract_stdout_argv(self.repo, archive, path), self.repo
        ).stdout.encode()

    @functools.cached_property
    def _definitions(self) -> dict[str, bytes]:
        """Every definition file of the run, read with one `borg extract` (they are small)."""
        with tempfile.TemporaryDirectory(prefix="incus-borg-definitions-") as tmp:
            argv = extract_argv(self.repo, self.archive, [str(layout.DEFINITIONS)], 0)
            self.borg.run(argv, self.repo, cwd=Path(tmp))
            return {
                str(p.relative_to(tmp)): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()
            }

    @contextmanager
    def tar(self, item: Item) -> Iterator[IO[bytes]]:
        strip = len(Path(item.path).parts)
        argv = export_tar_argv(self.repo, self._archive_of(item), item.path, strip)
        proc = self.borg.popen(argv, self.repo)
        assert proc.stdout is not None and proc.stderr is not None
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            code = proc.wait()
            stderr = proc.stderr.read().decode("utf-8", "replace")
            proc.stderr.close()
        raise_for("export-tar", self.repo, code, stderr)

    def extract(self, item: Item | None, paths: list[str], strip: int, dest: Path) -> None:
        argv = extract_argv(self.repo, self._archive_of(item), paths, strip)
        self.borg.run(argv, self.repo, cwd=dest)

    def has(self, item: Item) -> bool:
        argv = list_paths_argv(
            self.repo, self._archive_of(item), [f"{item.path}/backup/index.yaml"]
        )
        try:
            out = self.borg.run(argv, self.repo).stdout
        except UserError:
            return False
        return any(json.loads(line).get("path") for line in out.splitlines() if line.strip())
