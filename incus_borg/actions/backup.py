"""`incus-borg backup`: the whole server into one archive per repository, each instance
quiesced only while it is read (see backup/reader.py)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import click

from .. import layout, monitoring, preflight, profile
from ..backup import groups, policy
from ..backup.capture import Capture
from ..backup.export import Exporter, ExportLane
from ..backup.gate import Gate
from ..backup.plan import Plan
from ..backup.reader import Lane, Reader, lost_paths, missing
from ..backup.session import Session
from ..borg import Borg, comment_argv, create_argv, delete_argv, file_statuses, info_argv
from ..config import Config, Repository
from ..context import Context
from ..errors import EXIT_ERROR, UserError, Warnings
from ..host import testpoints
from ..manifest import Item
from ..runs.catalogue import Catalogue

# An export stream is one file whose tar headers break the alignment of identical content
# (a snapshot and the instance, or the same data in two runs): chunks of 64 KiB on average
# (2^16, 16 KiB to 4 MiB) find it again, where Borg's default (2 MiB) stores most of it twice
# (measured: an instance of 30 MiB with one snapshot, 61 MiB of stream, stored in 35 MB
# against 63 MB; what changes between two runs, the index and backup.yaml at each stream's
# start, costs about a chunk).
EXPORT_CHUNKER = "buzhash,14,22,16,4095"
# Snapshot copies change inodes and ctimes, not content; the paths are stable.
FILES_CACHE = "mtime,size"
FILES_CACHE_SUFFIX = "incus-borg"


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
    """What the run did, per repository, for the summary."""

    archives: dict[str, list[str]] = field(default_factory=dict)
    read: dict[str, int] = field(default_factory=dict)
    added: dict[str, int] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)
    changed_files: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    size: dict[str, int | None] = field(default_factory=dict)  # the repository's, after

    def record(self, archive: str, lane: Lane | ExportLane) -> None:
        """Count one lane's archive (a run's two archives add up), or why it failed."""
        name = lane.repo.name
        if lane.result is None:
            self.failed[name] = lane.failed or "stopped"
            return
        stats = lane.result.json()["archive"]["stats"]
        self.archives.setdefault(name, []).append(archive)
        self.read[name] = self.read.get(name, 0) + stats["original_size"]
        self.added[name] = self.added.get(name, 0) + stats["deduplicated_size"]
        self.files[name] = self.files.get(name, 0) + stats["nfiles"]
        changed = self.changed_files.get(name, 0) + lane.result.changed_files
        self.changed_files[name] = changed
        self.size[name] = lane.result.json().get("cache", {}).get("stats", {}).get("unique_csize")


def reporter(as_json: bool) -> Any:
    """Print progress lines on stdout, or on stderr when stdout carries JSON."""
    return lambda line: click.echo(line, err=as_json)


def run(ctx: Context, options: BackupOptions) -> int:
    """Back up the whole server (or the named instances); returns the exit code. The run
    goes into the local index; metrics and notifications follow (not for a dry run)."""
    action = partial(_run, ctx, options)
    return monitoring.watched(ctx, "backup", action, enabled=not options.dry_run)


def _run(ctx: Context, options: BackupOptions) -> int:
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
        with profile.phase("plan"):
            the_plan = session.plan(selection, options.mode)
        if options.dry_run:
            print_plan(the_plan, config, repos, session.report)
            return 0
        outcome = Outcome()
        capture = Capture(session)
        with session.holding("backup"), ThreadPoolExecutor(1) as background:
            # The repositories are checked while the metadata is written, and before the
            # first quiesce (the daemon's stop).
            checked = background.submit(check_repositories, borg, repos, outcome, warnings)
            capture.run_pres(the_plan)  # before anything is quiesced
            with capture.timed("capture"):
                capture.capture_metadata(the_plan)
                live = checked.result()
                database = capture.capture_state()
            testpoints.reached("captured")
            write_run(capture, the_plan, database, borg, live, outcome, options.progress)
    with profile.phase("index and metrics"):
        monitoring.record_backup(ctx, capture, the_plan, outcome)
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
    with profile.phase("repositories check"):
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


def write_run(
    capture: Capture,
    the_plan: Plan,
    database: str,
    borg: Borg,
    repos: list[Repository],
    outcome: Outcome,
    progress: bool,
) -> None:
    """Read the staging tree into every repository: side by side (one quiesce of each
    instance for all), or one repository after another. An instance's post command runs
    once it is released for the last time."""
    session = capture.session
    exact = database == "exact"

    def manifest_content() -> bytes:  # once every borg has read everything else
        session.quiescer.wait()  # the post commands started so far
        content = capture.manifest(the_plan, database, borg.version, False).to_json().encode()
        capture.import_files = (capture.import_files or {}) | {str(layout.MANIFEST): content}
        return content

    config = session.config
    passes = [[repo] for repo in repos] if config.quiesce_per_repository else [repos]
    env = {"BORG_FILES_CACHE_SUFFIX": FILES_CACHE_SUFFIX}
    exported = [item for item in the_plan.items if item.exported]
    in_place = [item for item in the_plan.items if not item.exported]
    for item in exported:
        item.archive = layout.export_archive(session.run)
    for repos_ in passes:
        capture.post_on_release = repos_ is passes[-1]
        capture.import_files = {}  # this pass's, for its repositories' catalogue entries
        if exported:  # first, so that the manifest says how each export went
            repos_ = write_exports(capture, the_plan, exported, borg, repos_, outcome)
        calls = [
            (repo, create_args(session.run, the_plan, repo, session.member, exact, in_place))
            for repo in repos_
        ]
        # Closing the gate lets every held open through: nothing may open a gated path
        # of this process's own (such as emptying staging) before it is closed.
        with Gate() as gate, capture.timed("read"):
            bounds = (config.max_window, config.stall_timeout)
            reader = Reader(capture, in_place, gate, *bounds, progress, the_plan.groups)
            lanes = reader.read(borg, calls, session.stage.root, env, manifest_content)
        for group in the_plan.groups:
            session.report(groups.done(group))
        for lane in lanes:
            drop_if_lacking(borg, in_place, lane, session.run)
            report_lane(capture, the_plan, lane, outcome)
            if not mark_partial(borg, the_plan, lane, session.run, session.member):
                catalogue(capture, lane)  # (a new comment gives the archive another id)


def catalogue(capture: Capture, lane: Lane) -> None:
    """Keep the small files of the run a lane committed in the run catalogue: its manifest
    (as it was written), definitions and instances' import files (as Borg read them)."""
    session = capture.session
    if lane.result is None or not capture.import_files:
        return
    files = dict(capture.import_files)
    definitions = session.stage.path(layout.DEFINITIONS)
    try:
        for path in sorted(definitions.rglob("*")):
            if path.is_file():
                files[str(layout.DEFINITIONS / path.relative_to(definitions))] = path.read_bytes()
        archive_id = str(lane.result.json()["archive"]["id"])
    except (OSError, KeyError, TypeError, ValueError):
        return  # no entry: the catalogue only saves reading the run back
    Catalogue.beside(session.config.staging_dir).store(
        lane.repo.path, session.run, archive_id, files
    )


def write_exports(
    capture: Capture,
    the_plan: Plan,
    items: list[Item],
    borg: Borg,
    repos: list[Repository],
    outcome: Outcome,
) -> list[Repository]:
    """Read the exported items into each repository's export archive (see backup/export.py);
    returns the repositories that hold it (the others are skipped for the rest of the run)."""
    session = capture.session
    name = layout.export_archive(session.run)
    comment = layout.run_comment(the_plan.partial, session.member)
    paths = [layout.stream_path(item.path) for item in items]
    calls = [(repo, export_argv(repo, name, paths, comment)) for repo in repos]
    roots = [session.stage.path(layout.EXPORTS / str(k)) for k in range(len(repos))]
    config = session.config
    exporter = Exporter(capture, items, config.max_window, config.stall_timeout)
    with capture.timed("export"):
        lanes = exporter.read(borg, calls, roots)
    for item in items:
        if item.failed is None:
            frozen = item.window is not None and item.mode in ("freeze", "stop")
            held = f", {item.mode} for {item.window:.2f} s" if frozen else ""
            session.report(f"{item.kind} {item.ref}: read {reading(item)}{held}")
    kept = []
    for lane in lanes:
        outcome.record(name, lane)
        if lane.result is None:
            session.warnings.add(
                f"repository {lane.repo.name} is skipped for this run: {lane.failed}"
            )
            continue
        kept.append(lane.repo)
        stats = lane.result.json()["archive"]["stats"]
        session.report(
            f"repository {lane.repo.name}: {name} read {stats['original_size'] / 1e6:.1f} MB "
            f"through Incus's export, added {stats['deduplicated_size'] / 1e6:.1f} MB"
        )
    return kept


def export_argv(repo: Repository, archive: str, paths: list[str], comment: str) -> list[str]:
    """`borg create` of the exported items' FIFOs (read as files: nothing else is there),
    chunked finely (see EXPORT_CHUNKER)."""
    return create_argv(
        repo,
        archive,
        paths,
        read_special=True,
        progress=True,
        comment=comment,
        chunker_params=EXPORT_CHUNKER,
    )


def drop_if_lacking(borg: Borg, items: list[Item], lane: Lane, run: str) -> None:
    """Delete the archive a lane committed when its borg excluded part of the server that
    every run must hold (the reader stops such a lane at the manifest's gate; this catches
    the manifest itself): that archive is not a run."""
    if lane.result is None:
        return
    lost = lost_paths(items, lane.result.messages)
    if lost:
        borg.run(delete_argv(lane.repo, [run]), lane.repo)
        lane.result = None
        lane.failed = f"repository {lane.repo.name} ({lane.repo.path}): {missing(lost)}"


def mark_partial(borg: Borg, the_plan: Plan, lane: Lane, run: str, member: str | None) -> bool:
    """A run that left an instance out while it was read (it could not be quiesced) is
    partial, although its archive was begun as a complete one: say so in its comment.
    Returns whether it did."""
    left_out = any(i.failed for i in the_plan.instances + the_plan.volumes)
    if lane.result is None or the_plan.partial or not left_out:
        return False
    comment = layout.run_comment(True, member)
    borg.run(comment_argv(lane.repo, run, comment), lane.repo)
    return True


def create_args(
    run: str,
    the_plan: Plan,
    repo: Repository,
    member: str | None = None,
    database: bool = True,
    items: list[Item] | None = None,
) -> list[str]:
    """`borg create` of the whole staging tree: the server's files (the database copy only
    when `database`), every item read in place (`items`, by default the plan's) in the plan's
    order, the manifest last (`member`: the cluster member making the run)."""
    items = the_plan.items if items is None else items
    left_out = {layout.MANIFEST} | (set() if database else {layout.DATABASE})
    server = [str(p) for p in layout.SERVER_PATHS if p not in left_out]
    paths = [*server, *(item.path for item in items), str(layout.MANIFEST)]
    excludes = [f"sh:{layout.INCUS}/{pattern}" for pattern in layout.INCUS_EXCLUDES]
    excludes += [p for item in items for p in policy.item_excludes(item)]
    return create_argv(
        repo,
        run,
        paths,
        excludes=excludes,
        files_cache=FILES_CACHE,
        progress=True,  # its regular lines show that borg is not stalled
        comment=layout.run_comment(the_plan.partial, member),
    )


def report_lane(capture: Capture, the_plan: Plan, lane: Lane, outcome: Outcome) -> None:
    """Say how a repository's read went, and count it."""
    session = capture.session
    outcome.record(session.run, lane)
    if lane.result is None:
        session.warnings.add(f"repository {lane.repo.name} is skipped for this run: {lane.failed}")
        return
    for message in lane.result.warnings:
        session.warnings.add(f"repository {lane.repo.name}: {message}")
    changed = changed_per_item(the_plan, lane)
    for item in the_plan.items:
        item.changed_files = changed.get(item.path, 0)
    stats = lane.result.json()["archive"]["stats"]
    session.report(
        f"repository {lane.repo.name}: {session.run} read {stats['original_size'] / 1e6:.1f} MB, "
        f"added {stats['deduplicated_size'] / 1e6:.1f} MB, "
        f"{lane.result.changed_files} file(s) not in the files cache"
    )


def changed_per_item(the_plan: Plan, lane: Lane) -> dict[str, int]:
    """Files each item had that missed Borg's files cache, from `--list` lines."""
    assert lane.result is not None
    prefixes = [item.path + "/" for item in the_plan.items]
    counts: dict[str, int] = {}
    for path in file_statuses(lane.result.messages, "AME"):
        for prefix in prefixes:
            if path.startswith(prefix):
                counts[prefix[:-1]] = counts.get(prefix[:-1], 0) + 1
                break
    return counts


def print_plan(the_plan: Plan, config: Config, repos: list[Repository], report: Any) -> None:
    """What a run would do, changing nothing."""
    report(f"staging: {config.staging_dir}")
    report("repositories: " + ", ".join(f"{r.name} ({r.path})" for r in repos))
    for note in the_plan.notes:
        report(note)
    for item in the_plan.items:
        report(
            f"{item.kind} {item.ref} on {item.pool} ({item.driver}): {item.mode} "
            f"(mode from {item.mode_source}), read {reading(item)}, snapshots "
            f"{item.snapshots or 'none'} -> {item.path}"
        )
        for line in policy.describe(item):
            report(f"  {line}")
    for group in the_plan.groups:
        report(groups.planned(group))
    for item in the_plan.skipped:
        report(
            f"{item.kind} {item.ref} on {item.pool}: skipped (mode skip from {item.mode_source})"
        )
    if any(item.excludes for item in the_plan.items):
        report(
            "excludes are applied by `backup`; in hook mode `hook pre` writes them to "
            f"{layout.excludes_file(Path(config.staging_dir))}: name it in borgmatic's "
            "`exclude_from`"
        )
    for other in the_plan.elsewhere:
        report(f"{other}: on another cluster member, skipped (its member's run holds it)")


def reading(item: Item) -> str:
    """How an item is read, in words."""
    if not item.exported:
        return "in place"
    how = {
        "snapshot": "Incus reads a read-only snapshot of its own, nothing is frozen",
        "freeze": "frozen while Incus makes its backup",
        "stop": "stopped while Incus makes its backup",
        "none": "read live: it may be inconsistent",
        "idle": "not running",
    }.get(item.mode, item.mode)
    return f"through Incus's export ({how})"


def summary(
    capture: Capture, the_plan: Plan, outcome: Outcome, warnings: Warnings
) -> dict[str, Any]:
    """The machine-readable summary printed by --json."""
    return {
        "run": capture.session.run,
        "member": capture.session.member,
        "archives": outcome.archives,
        "bytes_read": outcome.read,
        "deduplicated_bytes_added": outcome.added,
        "files": outcome.files,
        "changed_files": outcome.changed_files,
        "failed_repositories": outcome.failed,
        "daemon_downtime": capture.daemon_downtime,
        "timings": capture.timings,
        "profile": profile.PROFILE.as_dict(),
        "items": [
            {
                "kind": i.kind,
                "ref": i.ref,
                "mode": i.mode,
                "reader": i.reader,
                "failed": i.failed,
                "window": i.window,
                "bytes_read": i.bytes_read,
                "changed_files": i.changed_files,
            }
            for i in the_plan.items
        ],
        "warnings": warnings.messages,
        "exit_code": warnings.exit_code if outcome.archives else EXIT_ERROR,
    }
