"""`incus-borg backup`: quiesce, read each instance into its own archive, then the server."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from .. import layout, preflight
from ..backup import plan
from ..backup.capture import Capture
from ..backup.plan import Plan
from ..backup.session import Session
from ..borg import Borg, BorgResult, create_argv, info_argv
from ..config import Config, Repository
from ..context import Context
from ..errors import EXIT_ERROR, UserError, Warnings
from ..manifest import Item

INSTANCE_FILES_CACHE = "mtime,size"  # snapshot copies change inodes and ctimes, not content


@dataclass
class BackupOptions:
    """What the command line asked for."""

    mode: str | None = None
    instances: tuple[str, ...] = ()
    label: str | None = None
    dry_run: bool = False
    as_json: bool = False
    progress: bool = False


@dataclass
class Outcome:
    """What the run did, for the summary."""

    archives: dict[str, list[str]] = field(default_factory=dict)
    added: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    changed_files: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def record(self, repo: str, archive: str, result: BorgResult) -> None:
        """Count one created archive."""
        stats = result.json()["archive"]["stats"]
        self.archives.setdefault(repo, []).append(archive)
        self.added[repo] = self.added.get(repo, 0) + stats["deduplicated_size"]
        self.files[repo] = self.files.get(repo, 0) + stats["nfiles"]
        self.changed_files[repo] = self.changed_files.get(repo, 0) + result.changed_files


def part_archive(run: str, item: Item) -> str:
    """The archive holding one instance or volume of run `run`."""
    if item.kind == "instance":
        return layout.instance_archive(run, item.project, item.name)
    return layout.volume_archive(run, item.pool, item.project, item.name)


def files_cache_suffix(name: str) -> str:
    """A files-cache suffix per archive kind, so that entries never age out across parts."""
    return "incus-borg-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def reporter(as_json: bool) -> Any:
    """Print progress lines on stdout, or on stderr when stdout carries JSON."""
    return lambda line: click.echo(line, err=as_json)


def run(ctx: Context, options: BackupOptions) -> int:
    """Back up the whole server (or the named instances); returns the exit code."""
    config = ctx.config
    preflight.check(config, ctx.path)
    borg = ctx.borg()
    warnings = Warnings()
    session = Session(
        config, options.mode or config.mode, ctx.incus(), warnings, reporter(options.as_json)
    )
    repos = config.select_repositories(options.label)
    selection = list(options.instances) or config.instances
    with session.locked("backup"):
        the_plan = plan.build(session.incus, session.mode, selection)
        if options.dry_run:
            print_plan(the_plan, config, repos, session.report)
            return 0
        outcome = Outcome()
        live = check_repositories(borg, repos, outcome, warnings)
        capture = Capture(session)
        with session.holding("backup"):
            writer = Writer(borg, live, outcome, warnings, session.stage.root, options.progress)
            writer.partial = the_plan.partial
            read_all(capture, the_plan, writer)
    if options.as_json:
        click.echo(json.dumps(summary(capture, the_plan, outcome, warnings), indent=2))
    if not outcome.archives:
        raise UserError("no repository holds this run: " + "; ".join(outcome.failed.values()))
    return warnings.exit_code


def check_repositories(
    borg: Borg, repos: list[Repository], outcome: Outcome, warnings: Warnings
) -> list[Repository]:
    """The repositories that answer; an error when none does, a warning per one that does not."""
    live = []
    for repo in repos:
        try:
            borg.run(info_argv(repo), repo)
            live.append(repo)
        except UserError as exc:
            outcome.failed[repo.name] = str(exc)
    if not live:
        raise UserError("; ".join(outcome.failed.values()))
    for message in outcome.failed.values():
        warnings.add(message)
    return live


@dataclass
class Writer:
    """Creates archives of staging paths in every repository that is still healthy."""

    borg: Borg
    repos: list[Repository]
    outcome: Outcome
    warnings: Warnings
    cwd: Path
    progress: bool
    partial: bool = False  # the run is not the whole server (see layout.run_comment)

    def create(
        self,
        archive: str,
        paths: list[str],
        files_cache: str | None = None,
        excludes: list[str] | None = None,
    ) -> tuple[int, int]:
        """`borg create`; returns bytes read and files missing the files cache."""
        read = changed = 0
        suffix = files_cache_suffix(archive.partition(layout.PART_MARK)[2] or "server")
        for repo in list(self.repos):
            argv = create_argv(
                repo,
                archive,
                paths,
                excludes=excludes or (),
                files_cache=files_cache,
                progress=self.progress,
                comment=layout.run_comment(self.partial),
            )
            try:
                result = self.borg.run(
                    argv,
                    repo,
                    env={"BORG_FILES_CACHE_SUFFIX": suffix},
                    cwd=self.cwd,
                    show_progress=self.progress,
                )
            except UserError as exc:
                self.repos.remove(repo)
                self.outcome.failed[repo.name] = str(exc)
                self.warnings.add(
                    f"repository {repo.name} is skipped for the rest of the run: {exc}"
                )
                continue
            for message in result.warnings:
                self.warnings.add(f"repository {repo.name}: {message}")
            self.outcome.record(repo.name, archive, result)
            stats = result.json()["archive"]["stats"]
            read, changed = stats["original_size"], result.changed_files
        if not self.repos:
            raise UserError("every repository failed: " + "; ".join(self.outcome.failed.values()))
        return read, changed


def read_all(capture: Capture, the_plan: Plan, writer: Writer) -> None:
    """Capture the server, read each item into its own archive, then the server archive."""
    session = capture.session
    database = capture.capture_server(the_plan)
    for item in the_plan.items:
        item.archive = part_archive(session.run, item)
        held = capture.hold(item)
        read, changed = writer.create(item.archive, [item.path], INSTANCE_FILES_CACHE)
        item.window = capture.release(held)
        item.bytes_read, item.changed_files = read, changed
        session.report(
            f"{item.kind} {item.ref}: {item.mode}, window {item.window:.2f} s, "
            f"read {read / 1e6:.1f} MB, {changed} file(s) not in the files cache"
        )
    manifest = capture.manifest(the_plan, database, writer.borg.version, False)
    session.stage.write(layout.MANIFEST, manifest.to_json())
    paths = [str(p) for p in layout.SERVER_PATHS if session.stage.path(p).exists()]
    excludes = [f"sh:{layout.INCUS}/{pattern}" for pattern in layout.INCUS_EXCLUDES]
    read, changed = writer.create(session.run, paths, excludes=excludes)
    session.report(
        f"server: read {read / 1e6:.1f} MB into {session.run}, "
        f"{changed} file(s) not in the files cache"
    )


def print_plan(the_plan: Plan, config: Config, repos: list[Repository], report: Any) -> None:
    """What a run would do, changing nothing."""
    report(f"staging: {config.staging_dir}")
    report("repositories: " + ", ".join(f"{r.name} ({r.path})" for r in repos))
    for item in the_plan.items:
        report(
            f"{item.kind} {item.ref} on {item.pool} ({item.driver}): {item.mode}, "
            f"snapshots {item.snapshots or 'none'} -> {item.path}"
        )


def summary(
    capture: Capture, the_plan: Plan, outcome: Outcome, warnings: Warnings
) -> dict[str, Any]:
    """The machine-readable summary printed by --json."""
    return {
        "run": capture.session.run,
        "archives": outcome.archives,
        "deduplicated_bytes_added": outcome.added,
        "files": outcome.files,
        "changed_files": outcome.changed_files,
        "failed_repositories": outcome.failed,
        "daemon_downtime": capture.daemon_downtime,
        "items": [
            {
                "kind": i.kind,
                "ref": i.ref,
                "mode": i.mode,
                "window": i.window,
                "bytes_read": i.bytes_read,
                "changed_files": i.changed_files,
            }
            for i in the_plan.items
        ],
        "warnings": warnings.messages,
        "exit_code": warnings.exit_code if outcome.archives else EXIT_ERROR,
    }
