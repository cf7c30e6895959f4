"""`incus-borg check --drill`: proof that the newest complete run comes back whole.

A scratch Incus daemon starts in a temporary directory, in network and mount namespaces of its
own (`restore/scratch.py`); the run is rebuilt into it with `restore all`, every pool mapped
to a `dir` pool of the same name in the scratch directory. Every restored instance's and
volume's files are compared with the archive's own record (before anything starts and writes
to them); then what was running at backup time is started, and waited for until it runs.
Everything is torn down on every path, and the production server is never touched. The disk
space it needs is said first, and the drill is refused when the scratch file system lacks it.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..borg import Borg, explain_failure, list_files_argv, list_tree_argv
from ..config import Config, Repository
from ..errors import UserError
from ..host import signals, testpoints
from ..manifest import Item
from ..restore import all as all_kind
from ..restore import rebuild
from ..restore.compare import differing, in_places, places
from ..restore.graph import Graph, Node
from ..restore.journal import RestoreJournal, alive
from ..restore.poolmap import PoolMap
from ..restore.rebuild import Outcome, Plan
from ..restore.scratch import Scratch
from ..restore.source import NEWEST_COMPLETE, BorgSource
from ..restore.unpack import parse_listing

JOURNAL_KEY = "drill"
BLOCK = 4096  # what a file or directory takes at least
MARGIN = 256 << 20  # the scratch daemon's database, logs and images
SHOWN = 5  # differing files named per instance


@dataclass
class DrillOptions:
    """What `check --drill` was asked for."""

    instances: tuple[str, ...] = ()  # [P/]NAME; empty: every instance
    scratch: Path | None = None  # where the scratch directory goes (default: beside staging)


@dataclass
class Clock:
    """How long each phase took."""

    began: float = field(default_factory=time.monotonic)
    last: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now

    def __str__(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())
        return f"{time.monotonic() - self.began:.1f} s ({parts})"


def say(line: str) -> None:
    click.echo(f"drill: {line}")


def run(config: Config, borg: Borg, repo: Repository, options: DrillOptions) -> list[str]:
    """Drill the newest complete run of one repository; the problems found."""
    clock = Clock()
    source = BorgSource(borg, repo, "latest", latest=NEWEST_COMPLETE)
    whole = rebuild.read_graph(source)
    nodes = all_kind.selected(source, whole, (), options.instances)
    pools = {old: PoolMap(old, old, "dir") for old in rebuild.complete_map(whole, {})}
    items = [whole.items[n] for n in nodes if n in whole.items]
    parent = options.scratch or Path(config.staging_dir).parent
    journal = RestoreJournal.of(config)
    clear_dead_drill(journal)
    check_space(source, items, parent)
    clock.lap("space")
    scratch = Scratch.create(parent)
    left: list[str] = []
    try:
        with signals.interruptible():
            journal.record(JOURNAL_KEY, {"dir": str(scratch.root)})
            outcome, problems = exercise(scratch, source, (whole, nodes), pools, journal, clock)
    finally:
        with signals.shielded():
            left = scratch.teardown()
            clock.lap("teardown")
            if left:
                say(f"left behind in {scratch.root}: {', '.join(left)}")
            else:
                journal.clear(JOURNAL_KEY)
    if left:
        problems.append(f"the drill left {', '.join(left)}: remove them by hand")
    restored = [n for n in outcome.created if n.kind == "instances"]
    verdict = "passed" if not problems else "FAILED"
    say(
        f"{verdict}: {source.description}: {len(restored)} instance(s) restored in a scratch "
        f"Incus, in {clock}"
    )
    return [f"drill of {source.description}: {p}" for p in problems]


def exercise(
    scratch: Scratch,
    source: BorgSource,
    selection: tuple[Graph, set[Node]],
    pools: dict[str, PoolMap],
    journal: RestoreJournal,
    clock: Clock,
) -> tuple[Outcome, list[str]]:
    """Start the scratch daemon, rebuild the run into it, compare, start; what was restored
    and the problems, each item reported."""
    scratch.start()
    say(f"scratch Incus started in {scratch.root} (network namespace {scratch.netns})")
    clock.lap("daemon")
    incus = scratch.incus
    whole, nodes = selection
    plan = rebuild.make_plan(incus, source, whole, pools, nodes)
    inner = RestoreJournal(scratch.root / "restore-journal")
    outcome = rebuild.carry_out(incus, plan, inner, keep_going=True)
    clock.lap("restore")
    testpoints.reached("drill-restored")
    compared = compare(source, plan, outcome, scratch.dir)
    clock.lap("compare")
    started = all_kind.start_running(incus, plan, outcome.created)
    clock.lap("start")
    return outcome, report(plan, outcome, compared, started)


def check_space(source: BorgSource, items: list[Item], parent: Path) -> None:
    """Say how much disk the drill needs, and refuse when `parent` lacks it (or when
    containers could not reach their files below it)."""
    if not parent.is_dir():
        raise UserError(
            f"drill: {parent} is not a directory: create it, or name one with --scratch"
        )
    for directory in [parent.resolve(), *parent.resolve().parents]:
        if not directory.stat().st_mode & stat.S_IXOTH:
            raise UserError(
                f"drill: containers could not reach their files below {parent}: {directory} "
                "may not be entered by others (chmod o+x), or name another directory with --scratch"
            )
    needed = space_needed(source, items)
    free = shutil.disk_usage(parent).free
    say(f"needs about {mib(needed)} in {parent} ({mib(free)} free)")
    if free < needed:
        raise UserError(
            f"drill: needs about {mib(needed)} in {parent}, which has {mib(free)} free: free "
            "space there, or name another directory with --scratch"
        )


def mib(size: int) -> str:
    return f"{-(-size // (1 << 20))} MiB"


def space_needed(source: BorgSource, items: list[Item]) -> int:
    """The disk the restored items take (from one listing per archive and top directory,
    with no data read), plus the largest volume once more (Incus copies an upload before
    unpacking it) and a margin for the daemon."""
    tops = sorted({(i.archive or source.archive, i.path.split("/")[0]) for i in items})
    calls: list[tuple[Sequence[str], Path | None]] = [
        (list_tree_argv(source.repo, archive, top), None) for archive, top in tops
    ]
    results = source.borg.run_parallel(calls, source.repo, os.cpu_count() or 1)
    sizes = dict.fromkeys((i.path for i in items), 0)
    for result in results:
        for entry in parse_listing(result.stdout):
            owner = entry.path.split("/backup/", 1)[0]
            if owner in sizes and not entry.hard_link:
                sizes[owner] += max(BLOCK, -(-entry.size // BLOCK) * BLOCK)
    volumes = [sizes[i.path] for i in items if i.kind == "volume"]
    return sum(sizes.values()) + max(volumes, default=0) + MARGIN


def clear_dead_drill(journal: RestoreJournal) -> None:
    """Tear down what a killed drill left (named in the restore journal); refuse while
    another drill runs."""
    entry = journal.read(JOURNAL_KEY)
    if entry is None:
        return
    if alive(entry):
        raise UserError(f"a drill (pid {entry['pid']}) is under way: wait for it to finish")
    say(f"removing what a killed drill left in {entry['dir']}")
    left = Scratch(Path(entry["dir"])).teardown()
    if left:
        raise UserError(f"a killed drill left {', '.join(left)}: remove them by hand")
    journal.clear(JOURNAL_KEY)


def compare(
    source: BorgSource, plan: Plan, outcome: Outcome, incus_dir: Path
) -> dict[Node, tuple[int, list[str]] | str]:
    """Per restored instance and volume: how many files were compared and those that differ
    from the archive's record, or why it could not be compared."""
    restored = [n for n in outcome.created if n in plan.graph.items]
    listed = [n for n in restored if not plan.graph.items[n].exported]
    calls: list[tuple[Sequence[str], Path | None]] = []
    for node in listed:
        item = plan.graph.items[node]
        archive = item.archive or source.archive
        calls.append((list_files_argv(source.repo, archive, f"{item.path}/backup"), None))
    failures = tuple(range(2, 256))  # reported per item below
    results = source.borg.run_parallel(calls, source.repo, os.cpu_count() or 1, ok_codes=failures)
    listings: dict[Node, str] = {}
    found: dict[Node, tuple[int, list[str]] | str] = {}
    for node, result in zip(listed, results, strict=True):
        if result.returncode in failures:
            found[node] = explain_failure("list", source.repo, result)
        else:
            listings[node] = result.stdout
    for node in restored:
        if node not in listed:
            try:
                listings[node] = source.listing(plan.graph.items[node])
            except UserError as exc:
                found[node] = str(exc)
    for node, listing in listings.items():
        item = plan.graph.items[node]
        where = places(incus_dir, plan.pool(item.pool), item)
        count, wrong = differing(listing, in_places(item, where))
        top = f"{item.path}/backup/"
        found[node] = (count, [path.removeprefix(top) for path in wrong])
    return found


def report(
    plan: Plan,
    outcome: Outcome,
    compared: dict[Node, tuple[int, list[str]] | str],
    started: dict[Node, float | str],
) -> list[str]:
    """One line per instance and volume (restored, files matching, started, times); the
    problems."""
    problems = [
        f"{n.label}: {why}" for n, why in outcome.failed.items() if n not in plan.graph.items
    ]
    for step in plan.steps:
        node = step.node
        if node not in plan.graph.items:
            continue
        if node in outcome.failed:
            problems.append(f"{node.label}: not restored: {outcome.failed[node]}")
            say(f"{node.label}: NOT restored: {outcome.failed[node]}")
            continue
        parts = [f"restored in {outcome.seconds[node]:.1f} s"]
        files = compared.get(node, "not compared")
        if isinstance(files, str):
            problems.append(f"{node.label}: its files could not be compared: {files}")
            parts.append(f"files NOT compared: {files}")
        elif files[1]:
            shown = ", ".join(files[1][:SHOWN]) + (" ..." if len(files[1]) > SHOWN else "")
            problems.append(f"{node.label}: {len(files[1])} file(s) differ: {shown}")
            parts.append(f"{len(files[1])} of {files[0]} files DIFFER")
        else:
            parts.append(f"{files[0]} files match")
        parts += _start_part(plan, node, started, problems)
        say(f"{node.label}: {', '.join(parts)}")
    return problems


def _start_part(
    plan: Plan, node: Node, started: dict[Node, float | str], problems: list[str]
) -> list[str]:
    if node.kind != "instances":
        return []
    if node not in started:
        return ["not started (stopped at backup time)"]
    result = started[node]
    if isinstance(result, str):
        problems.append(f"{node.label}: does not start: {result}")
        return [f"does NOT start: {result}"]
    return [f"started in {result:.1f} s"]
