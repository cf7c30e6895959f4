"""Where a restore reads from: a run in a Borg repository, or a directory holding a staging tree.

Both give the manifest, single files, a tar stream of an item (as `incus import` takes it),
an item's listing, and extraction of paths into a directory.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from .. import layout, runs, yamlio
from ..borg import (
    Borg,
    export_tar_argv,
    extract_argv,
    extract_stdout_argv,
    list_argv,
    list_exact_argv,
    list_tree_argv,
    raise_for,
)
from ..config import Repository
from ..context import Context
from ..errors import UserError
from ..host.processes import stop
from ..manifest import Item, Manifest
from ..runs.catalogue import Catalogue
from .stream import listing, member_name, read_member, untar
from .unpack import Entry, Extractions, parse_listing, walk_listing

ARCHIVE_MISSING = 31  # borg's exit code for an archive that does not exist


class Source(Protocol):
    """What restore needs from a backup."""

    manifest: Manifest
    description: str

    def read(self, path: str, item: Item | None = None) -> bytes:
        """One file of the run (of the item's own archive, when given)."""

    def tar(self, item: Item) -> Any:
        """A context manager yielding a readable tar stream of the item's `backup/` tree."""

    def extract(
        self,
        item: Item | None,
        paths: list[str],
        strip: int,
        dest: Path,
        excludes: tuple[str, ...] = (),
    ) -> None:
        """Extract `paths` (less the `excludes` subtrees) of the item's archive (or the run's
        own) into `dest`, dropping `strip` leading parts."""

    def inspect(self, item: Item, files: list[str]) -> tuple[dict[str, bytes], list[Entry]]:
        """Some small files of the item, and the listing of its `backup/` tree."""

    def extract_all(self, item: Item, extractions: Extractions) -> None:
        """Run the extractions of the item (in parallel where the source can)."""

    def missing(self, items: list[Item]) -> list[Item]:
        """The items whose index or data is not really there."""


def needed(item: Item) -> list[str]:
    """The paths of an item a run must hold for it to be restored."""
    if item.exported:
        return [layout.stream_path(item.path)]
    members = layout.item_members(item.kind, item.type == "block")
    return [f"{item.path}/backup/{member}" for member in members]


def stream_member(item: Item, stream: IO[bytes], path: str, where: str) -> bytes:
    """One file of an exported item (an archive path of its subtree), read from its stream."""
    found = read_member(stream, member_name(item, path))
    if found is None:
        raise UserError(f"{path} is not in the export of {item.kind} {item.ref} in {where}")
    return found


def untar_paths(item: Item, stream: IO[bytes], paths: list[str], strip: int, dest: Path) -> None:
    """Extract archive paths of an exported item's subtree from its stream into `dest`
    (`strip`: leading parts of the archive paths dropped)."""
    names = [member_name(item, path) for path in paths]
    untar(stream, names, strip - len(Path(item.path).parts), dest)


def definitions(source: Source, kind: str) -> list[dict[str, Any]]:
    """The archived definitions of one kind (profiles, networks, projects, ...)."""
    data = yamlio.load(source.read(f"{layout.DEFINITIONS}/{kind}.yaml"))
    return list(data or [])


def _agrees(files: dict[str, bytes], entries: list[Entry]) -> bool:
    """Whether catalogued files have the sizes the archive lists for them (an archive of
    the same name but other content, such as one made again after a rename, has others)."""
    sizes = {e.path: e.size for e in entries if e.type == "-"}
    return all(sizes.get(path) == len(content) for path, content in files.items())


def _files_below(root: Path) -> dict[str, bytes]:
    """Every regular file below `root`, by its path relative to `root`."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@dataclass(frozen=True)
class Latest:
    """Which run `latest` names for one command: the newest run, the newest complete run
    (`complete`), or the newest run whose manifest `holds` what the command restores."""

    complete: bool = False
    holds: Callable[[Manifest], bool] | None = None
    what: str = "incus-borg run"  # "repository R holds no <what>" when no run qualifies
    scope: runs.Scope = runs.EVERY  # whose runs (on a cluster: one member's)

    def accepts(self, manifest: Manifest) -> bool:
        """Whether the run with this manifest qualifies."""
        if self.complete and manifest.partial:
            return False
        return self.holds is None or self.holds(manifest)


NEWEST = Latest()
NEWEST_COMPLETE = Latest(
    complete=True, what="complete run (one made without --instance or `instances:`)"
)


def open_source(
    spec: str,
    borg: Borg | None,
    repo: Repository,
    expect: tuple[str, str] | None = None,
    latest: Latest = NEWEST,
    catalogue: Catalogue | None = None,
) -> Source:
    """A directory (holding manifest.json), `latest` (as `latest` says), or an archive name
    in `repo`; `expect` names an instance (project, name) that the restore will read;
    `catalogue`: where this host keeps the small files of the runs it made."""
    path = Path(spec)
    if path.is_dir():
        if not (path / str(layout.MANIFEST)).is_file():
            raise UserError(f"{path} holds no {layout.MANIFEST}: point at a restored staging tree")
        return DirectorySource(path)
    if borg is None:
        raise UserError(f"{spec} is not a directory")
    return BorgSource(borg, repo, spec, expect, latest, catalogue)


def open_run(
    ctx: Context,
    spec: str,
    label: str | None,
    expect: tuple[str, str] | None = None,
    latest: Latest = NEWEST,
) -> Source:
    """The run to restore from: a directory, `latest` or an archive, in the repository
    labelled `label` (default: the first); `expect` names an instance (project, name) the
    restore will read."""
    repo = ctx.config.select_repositories(label)[0]
    borg = None if Path(spec).is_dir() else ctx.borg()
    if spec == "latest":
        latest = dataclasses.replace(latest, scope=ctx.scope())
    catalogue = Catalogue.beside(ctx.config.staging_dir)
    return open_source(spec, borg, repo, expect, latest, catalogue)


def newest_complete(source: Source) -> str | None:
    """The newest complete run in the repository `source` reads from (None for a directory,
    or when there is none)."""
    if isinstance(source, BorgSource):
        return runs.newest_complete(source.borg, source.repo)
    return None


def _wanted(latest: Latest, found: list[runs.Run], names: list[str]) -> str:
    """What `latest` looked for and did not find, and where to look instead."""
    what = latest.what if names else "incus-borg run"
    if latest.scope != runs.EVERY:
        what += f" {latest.scope.describe()}"
    what += "" if names else " yet"
    others = [m for m in runs.members(found) if m != latest.scope.member]
    if others:
        what += f" (members {', '.join(others)} have runs: name one with --member)"
    return what + ": see `incus-borg list`"


class DirectorySource:
    """A staging tree restored by another program (restic restore, borg extract, ...)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = str(root)
        self.manifest = Manifest.from_json(self.read(str(layout.MANIFEST)).decode())

    def read(self, path: str, item: Item | None = None) -> bytes:
        if item is not None and item.exported:
            with self.tar(item) as stream:
                return stream_member(item, stream, path, self.description)
        try:
            return (self.root / path).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {path} in {self.root}: {exc.strerror}") from None

    @contextmanager
    def tar(self, item: Item) -> Iterator[IO[bytes]]:
        if item.exported:
            try:
                with (self.root / layout.stream_path(item.path)).open("rb") as stream:
                    yield stream
            except OSError as exc:
                raise UserError(f"cannot read {item.path} in {self.root}: {exc.strerror}") from None
            return
        argv = ["tar", "-C", str(self.root / item.path), "--numeric-owner", "--xattrs"]
        argv += ["--xattrs-include=*", "-cf", "-", "backup"]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            try:
                yield proc.stdout
            except BaseException:
                stop(proc)
                raise
            proc.stdout.close()
            if proc.wait() != 0:
                stderr = proc.stderr.read().decode() if proc.stderr else ""
                raise UserError(f"reading {item.path} from {self.root} failed: {stderr.strip()}")

    def extract(
        self,
        item: Item | None,
        paths: list[str],
        strip: int,
        dest: Path,
        excludes: tuple[str, ...] = (),
    ) -> None:
        if item is not None and item.exported:
            with self.tar(item) as tarball:
                untar_paths(item, tarball, paths, strip, dest)
            return
        for path in paths:
            if not os.path.lexists(self.root / path):
                raise UserError(f"{path} is not in {self.root}")
        keep = ["--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls"]
        skip = [f"--exclude={path}" for path in excludes]
        pack = ["tar", "-C", str(self.root), *keep, "--anchored", "--no-wildcards", *skip]
        unpack = ["tar", "-C", str(dest), *keep, f"--strip-components={strip}", "-xf", "-"]
        # The packer's messages go to a file: a full pipe nobody reads would stall it.
        with (
            tempfile.TemporaryFile() as messages,
            subprocess.Popen(
                [*pack, "-cf", "-", "--", *paths], stdout=subprocess.PIPE, stderr=messages
            ) as packer,
        ):
            done = subprocess.run(unpack, stdin=packer.stdout, capture_output=True, check=False)
            assert packer.stdout is not None
            packer.stdout.close()
            failed = packer.wait() != 0 or done.returncode != 0
            messages.seek(0)
            errors = messages.read().decode() + done.stderr.decode()
        if failed:
            raise UserError(f"copying {', '.join(paths)} from {self.root} failed: {errors.strip()}")

    def inspect(self, item: Item, files: list[str]) -> tuple[dict[str, bytes], list[Entry]]:
        return {f: self.read(f) for f in files}, walk_listing(self.root, f"{item.path}/backup")

    def extract_all(self, item: Item, extractions: Extractions) -> None:
        extractions.prepare()
        for job in extractions.jobs:
            self.extract(item, list(job.paths), job.strip, job.dest, job.excludes)
        extractions.finish()

    def missing(self, items: list[Item]) -> list[Item]:
        return [i for i in items if not all(os.path.lexists(self.root / p) for p in needed(i))]


class BorgSource:
    """One run in a Borg repository: its archive (and, for runs of format 1, the part
    archive of each instance and volume)."""

    def __init__(
        self,
        borg: Borg,
        repo: Repository,
        name: str,
        expect: tuple[str, str] | None = None,
        latest: Latest = NEWEST,
        catalogue: Catalogue | None = None,
    ) -> None:
        """`expect`: the (project, name) of an instance whose files and listing are read
        along with the run, in parallel (an instance in another project is read later).
        `latest`: which run the name `latest` means. `catalogue`: where the run's small
        files may be found without reading the archive (runs/catalogue.py)."""
        self.borg = borg
        self.repo = repo
        self._inspected: dict[tuple[str, tuple[str, ...]], tuple[dict[str, bytes], str]] = {}
        # (archive, stage) -> the listing of an item's tree, under way
        self._listings: dict[tuple[str, str], Future[str]] = {}
        # `latest`: manifests are read newest first until one qualifies (a shared repository
        # holds other archives). A named archive needs no listing: reading it tells.
        found: list[runs.Run] = []
        if name == "latest":
            found = runs.find(borg, repo)
            chosen = runs.candidates(found, latest.complete, latest.scope)
            names = [(r.name, r.id) for r in chosen]
        else:
            names = [(name, None)]
        for candidate, archive_id in names:
            self.archive = candidate
            known = self._catalogued(catalogue, archive_id, name != "latest", expect)
            self._run_files = known or self._read_run(expect)
            text = self._run_files.get(str(layout.MANIFEST), b"").strip()
            if text:
                self.manifest = Manifest.from_json(text.decode())
                if name != "latest" or latest.accepts(self.manifest):
                    if known and archive_id is not None:
                        self._list_ahead(expect)
                    break
        else:
            if name != "latest":
                raise UserError(f"repository {repo.name} holds no incus-borg run in {name!r}")
            raise UserError(
                f"repository {repo.name} holds no {_wanted(latest, found, [n for n, _ in names])}"
            )
        self.description = f"{repo.name}::{self.archive}"

    def _read_run(self, expect: tuple[str, str] | None) -> dict[str, bytes]:
        """The run's manifest and definitions (all small), read with one `borg extract`;
        with them (and, in parallel, its listing) the expected instance's import files, where
        the run's own archive holds its instances (runs of format 1 hold them in parts)."""
        with tempfile.TemporaryDirectory(prefix="incus-borg-run-") as tmp:
            wanted = [str(layout.MANIFEST), str(layout.DEFINITIONS)]
            files: list[str] = []
            if expect:
                stage = str(layout.instance_stage(*expect))
                files = layout.instance_import_files(stage)
            calls: list[tuple[Sequence[str], Path | None]] = [
                (extract_argv(self.repo, self.archive, wanted + files, 0), Path(tmp))
            ]
            if expect:
                calls.append((list_tree_argv(self.repo, self.archive, f"{stage}/backup"), None))
            results = self.borg.run_parallel(
                calls, self.repo, len(calls), ok_codes=(ARCHIVE_MISSING,)
            )
            if results[0].returncode == ARCHIVE_MISSING:
                raise self._missing(self.archive)
            found = _files_below(Path(tmp))
            if files and all(f in found for f in files):
                item_files = {f: found[f] for f in files}
                self._inspected[(self.archive, tuple(files))] = (item_files, results[1].stdout)
            return found

    def _catalogued(
        self,
        catalogue: Catalogue | None,
        archive_id: str | None,
        named: bool,
        expect: tuple[str, str] | None,
    ) -> dict[str, bytes]:
        """The run's small files from the catalogue, or nothing: only an entry of the
        archive's own id is used. `latest` knows the id from the repository's listing; for
        an archive named on the command line (`named`) the repository is listed beside the
        archive's run files and the expected instance's tree (whose listing the restore
        needs anyway), and the files listed must also have the entry's sizes."""
        if catalogue is None or (archive_id is None and not named):
            return {}
        if archive_id is not None:
            return catalogue.load(self.repo.path, self.archive, archive_id)
        if str(layout.MANIFEST) not in catalogue.load(self.repo.path, self.archive, None):
            return {}  # no entry: nothing to check
        stage = str(layout.instance_stage(*expect)) if expect else None
        paths = [str(layout.MANIFEST), str(layout.DEFINITIONS)]
        tree = list_tree_argv(
            self.repo, self.archive, *paths, *([f"{stage}/backup"] if stage else [])
        )
        calls: list[tuple[Sequence[str], Path | None]] = [
            (list_argv(self.repo), None),
            (tree, None),
        ]
        archives, listing = self.borg.run_parallel(calls, self.repo, 2, ok_codes=(ARCHIVE_MISSING,))
        if listing.returncode == ARCHIVE_MISSING:
            raise self._missing(self.archive)
        ids = {a["name"]: a["id"] for a in archives.json()["archives"]}
        known = catalogue.load(self.repo.path, self.archive, ids.get(self.archive, ""))
        entries = parse_listing(listing.stdout)
        listed = {e.path for e in entries}
        catalogued = {f: c for f, c in known.items() if f in listed}
        if str(layout.MANIFEST) not in catalogued or not _agrees(catalogued, entries):
            return {}
        if stage is not None:
            files = layout.instance_import_files(stage)
            if all(f in known for f in files):
                inspected = ({f: known[f] for f in files}, listing.stdout)
                self._inspected[(self.archive, tuple(files))] = inspected
        return known

    def _missing(self, archive: str) -> UserError:
        return UserError(
            f"no archive {archive!r} in repository {self.repo.name}: see `incus-borg list`"
        )

    def _list_ahead(self, expect: tuple[str, str] | None) -> None:
        """Start listing the expected instance's tree (the restore needs it once it has
        checked what it can against the run's catalogued files)."""
        wanted = [i for i in self.manifest.instances if (i.project, i.name) == expect]
        if not wanted or wanted[0].exported or wanted[0].archive:  # its stream holds it
            return
        stage = wanted[0].path
        pool = ThreadPoolExecutor(1, thread_name_prefix="incus-borg-listing")
        tree = [f"{stage}/backup"]
        self._listings[(self.archive, stage)] = pool.submit(self._listed, self.archive, tree)
        pool.shutdown(wait=False)  # its thread ends with the listing

    def _listing(self, archive: str, stage: str) -> str:
        """The listing of an item's tree: the one started ahead, else a new one."""
        future = self._listings.pop((archive, stage), None)
        return future.result() if future else self._listed(archive, [f"{stage}/backup"])

    def _listed(self, archive: str, paths: list[str]) -> str:
        """The listing of paths of an archive (see `list_tree_argv`)."""
        argv = list_tree_argv(self.repo, archive, *paths)
        result = self.borg.run(argv, self.repo, ok_codes=(ARCHIVE_MISSING,))
        if result.returncode == ARCHIVE_MISSING:
            raise self._missing(archive)
        return result.stdout

    def _inspect_calls(
        self, archive: str, stage: str, files: list[str], cwd: Path
    ) -> list[tuple[Sequence[str], Path | None]]:
        """Reading some files of an item (into `cwd`) and listing its `backup/` tree."""
        return [
            (extract_argv(self.repo, archive, files, 0), cwd),
            (list_tree_argv(self.repo, archive, f"{stage}/backup"), None),
        ]

    def _archive_of(self, item: Item | None) -> str:
        return (item.archive if item else None) or self.archive

    def read(self, path: str, item: Item | None = None) -> bytes:
        archive = self._archive_of(item)
        if item is not None and item.exported:
            with self.tar(item, partial=True) as stream:
                return stream_member(item, stream, path, self.description)
        if archive == self.archive and path.startswith(f"{layout.DEFINITIONS}/"):
            return self._run_files.get(path, b"")
        return self.borg.run(
            extract_stdout_argv(self.repo, archive, path), self.repo
        ).stdout.encode()

    def inspect(self, item: Item, files: list[str]) -> tuple[dict[str, bytes], list[Entry]]:
        archive = self._archive_of(item)
        known = self._inspected.get((archive, tuple(files)))
        if known is None and archive == self.archive and all(f in self._run_files for f in files):
            catalogued = {f: self._run_files[f] for f in files}
            text = self._listing(archive, item.path)
            if _agrees(catalogued, parse_listing(text)):
                known = (catalogued, text)
        if known is None:
            with tempfile.TemporaryDirectory(prefix="incus-borg-item-") as tmp:
                calls = self._inspect_calls(archive, item.path, files, Path(tmp))
                _, listing = self.borg.run_parallel(calls, self.repo, len(calls))
                known = (_files_below(Path(tmp)), listing.stdout)
        found, listing_text = known
        tree = f"{item.path}/backup"
        entries = [e for e in parse_listing(listing_text) if e.path.startswith(tree)]
        return {f: found.get(f, b"") for f in files}, entries

    def extract_all(self, item: Item, extractions: Extractions) -> None:
        archive = self._archive_of(item)
        calls: list[tuple[Sequence[str], Path | None]] = [
            (extract_argv(self.repo, archive, job.paths, job.strip, job.excludes), job.dest)
            for job in extractions.jobs
        ]
        extractions.prepare()
        self.borg.run_parallel(calls, self.repo, os.cpu_count() or 1, pause="restore-extracting")
        extractions.finish()

    def listing(self, item: Item) -> str:
        """An exported item's files, as `borg list` gives those of an item read in place."""
        with self.tar(item) as stream:
            return listing(item, stream)

    @contextmanager
    def tar(self, item: Item, partial: bool = False) -> Iterator[IO[bytes]]:
        """The item as a tar stream of `backup/...`: Incus's own stream for an exported item,
        else its subtree (`borg export-tar`). With `partial`, the reader may stop early (borg
        then ends on a broken pipe, which is no failure)."""
        strip = len(Path(item.path).parts)
        archive = self._archive_of(item)
        if item.exported:
            argv = extract_stdout_argv(self.repo, archive, layout.stream_path(item.path))
        else:
            argv = export_tar_argv(self.repo, archive, item.path, strip)
        proc = self.borg.popen(argv, self.repo)
        assert proc.stdout is not None and proc.stderr is not None
        try:
            yield proc.stdout
        except BaseException:
            stop(proc)  # its reader failed or was interrupted: borg may never see a broken pipe
            raise
        finally:
            proc.stdout.close()
            code = proc.wait()
            stderr = proc.stderr.read().decode("utf-8", "replace")
            proc.stderr.close()
        if not partial:
            raise_for(argv[0], self.repo, code, stderr)

    def extract(
        self,
        item: Item | None,
        paths: list[str],
        strip: int,
        dest: Path,
        excludes: tuple[str, ...] = (),
    ) -> None:
        if item is not None and item.exported:
            with self.tar(item) as tarball:
                untar_paths(item, tarball, paths, strip, dest)
            return
        argv = extract_argv(self.repo, self._archive_of(item), paths, strip, excludes)
        self.borg.run(argv, self.repo, cwd=dest)

    def missing(self, items: list[Item]) -> list[Item]:
        """One listing per archive (the run's own, or each part of a run of format 1)."""
        by_archive: dict[str, list[Item]] = {}
        for item in items:
            by_archive.setdefault(self._archive_of(item), []).append(item)
        absent = []
        for archive, held in by_archive.items():
            wanted = [path for item in held for path in needed(item)]
            argv = list_exact_argv(self.repo, archive, wanted)
            result = self.borg.run(argv, self.repo, ok_codes=(ARCHIVE_MISSING,))
            found = set(result.stdout.splitlines())
            absent += [item for item in held if not set(needed(item)) <= found]
        return absent
