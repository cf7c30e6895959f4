"""What a run is in a repository, found from one listing of its archives.

A run is its run archive, named `<run>` (no `@`; it holds the manifest), and, for runs of
manifest format 1, its part archives `<run>@instance@...` and `<run>@volume@...`. Every
archive incus-borg makes carries the comment `layout.run_comment`, which says whether the run
is complete or partial; older versions wrote the plain mark, and such a run's state is read
from its manifest when it matters. What an interrupted run left (part archives whose run
archive is missing, and Borg's checkpoint archives of incus-borg's archives) is an
*incomplete* run. Archives without the mark are not incus-borg's: a run made by another
program around `hook pre`/`hook post` can only be recognised by reading it.

On a cluster, every member writes its own runs, and the comment names the member
(`member=NAME`): `latest` and `prune` mean one member's runs (a `Scope`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import layout
from ..borg import Borg, extract_stdout_argv, list_archives_argv
from ..config import Repository
from ..errors import UserError
from ..manifest import Manifest

COMPLETE, PARTIAL, UNKNOWN = layout.COMPLETE, layout.PARTIAL, layout.UNKNOWN
INCOMPLETE = "incomplete"


@dataclass(frozen=True)
class Archive:
    """One archive as `borg list` shows it."""

    name: str
    start: datetime
    state: str | None  # what its comment says (layout.parse_comment); None: not incus-borg's
    member: str | None = None  # the cluster member that made it; None: not clustered
    id: str | None = None  # Borg's archive id

    @classmethod
    def from_listing(cls, entry: dict[str, Any]) -> Archive:
        """An entry of `borg list --json` (see borg.list_archives_argv)."""
        comment = entry.get("comment") or ""
        if not comment and layout.checkpoint_of(entry["name"]) is not None:
            # Borg saves checkpoints without the comment; the command line still has it.
            comment = given_comment(entry.get("command_line") or [])
        state = layout.parse_comment(comment)
        start = datetime.fromisoformat(entry["start"])
        return cls(entry["name"], start, state, layout.comment_member(comment), entry.get("id"))


def given_comment(argv: Sequence[str]) -> str:
    """The `--comment` a borg command line gave, or ""."""
    for i, arg in enumerate(argv):
        if arg == "--comment" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--comment="):
            return arg.partition("=")[2]
    return ""


@dataclass
class Run:
    """A run: its name, when its run archive was made, its state and all its archives."""

    name: str
    start: datetime  # an incomplete run: when its newest archive was made
    state: str | None  # complete, partial, unknown, incomplete; None: not incus-borg's
    archives: list[str] = field(default_factory=list)  # the run archive first
    member: str | None = None  # the cluster member that made it; None: not clustered
    id: str | None = None  # Borg's id of its run archive (None: an incomplete run)

    @property
    def ours(self) -> bool:
        """Whether incus-borg made it (and `prune` may delete it)."""
        return self.state is not None

    @property
    def parts(self) -> int:
        """How many part archives it has."""
        return sum(1 for name in self.archives if layout.is_part(name))


def group(archives: Iterable[Archive]) -> list[Run]:
    """The runs and incomplete runs these archives make up, oldest first."""
    archives = list(archives)
    runs = {
        a.name: Run(a.name, a.start, a.state, [a.name], a.member, a.id)
        for a in archives
        if not layout.is_part(a.name) and layout.checkpoint_of(a.name) is None
    }
    leftovers: dict[str, list[Archive]] = {}
    for a in archives:
        if a.name in runs or a.state is None:
            continue
        checkpoint = layout.checkpoint_of(a.name)
        run = layout.run_of(checkpoint or a.name)
        if checkpoint is None and run in runs:
            runs[run].archives.append(a.name)
        else:
            leftovers.setdefault(run, []).append(a)
    incomplete = [
        Run(
            name,
            max(a.start for a in left),
            INCOMPLETE,
            [a.name for a in left],
            next((a.member for a in left if a.member), None),
        )
        for name, left in leftovers.items()
    ]
    return sorted([*runs.values(), *incomplete], key=lambda r: r.start)


def find(borg: Borg, repo: Repository) -> list[Run]:
    """Every run in the repository (with incomplete ones and other programs' archives),
    oldest first, from one listing."""
    listing = borg.run(list_archives_argv(repo), repo).json()["archives"]
    return group(Archive.from_listing(entry) for entry in listing)


@dataclass(frozen=True)
class Scope:
    """Whose runs a command means: those of one cluster member (`member`; None: of servers
    that were not clustered), or (`every`) all of them."""

    member: str | None = None
    every: bool = False

    def holds(self, run: Run) -> bool:
        """Whether `run` is within the scope."""
        return self.every or run.member == self.member

    def describe(self) -> str:
        """The scope, in words."""
        if self.every:
            return "of any member"
        return f"of member {self.member}" if self.member else "of a server not clustered"


EVERY = Scope(every=True)


def members(runs: Iterable[Run]) -> list[str]:
    """The cluster members that made some of these runs."""
    return sorted({run.member for run in runs if run.member})


def candidates(runs: list[Run], complete: bool, scope: Scope = EVERY) -> list[Run]:
    """The runs that `latest` may name, newest first: within `scope`, not incomplete, and
    with `complete` not known to be partial."""
    skip = {INCOMPLETE, PARTIAL} if complete else {INCOMPLETE}
    return [run for run in reversed(runs) if run.state not in skip and scope.holds(run)]


def read_manifests(borg: Borg, repo: Repository, names: list[str]) -> list[Manifest | None]:
    """The manifest of each run archive (None where there is none), read in parallel."""
    calls: list[tuple[Sequence[str], Path | None]] = [
        (extract_stdout_argv(repo, name, str(layout.MANIFEST)), None) for name in names
    ]
    results = borg.run_parallel(calls, repo, os.cpu_count() or 1)
    return [_manifest(result.stdout) for result in results]


def _manifest(text: str) -> Manifest | None:
    try:
        return Manifest.from_json(text) if text.strip() else None
    except (UserError, TypeError, KeyError):
        return None


def resolve(borg: Borg, repo: Repository, runs: list[Run]) -> list[Run]:
    """`runs` with the state of older incus-borg runs (plain mark) read from their manifests;
    one without a readable manifest counts as complete, as it always did."""
    unknown = [run for run in runs if run.state == UNKNOWN]
    if unknown:
        for run, manifest in zip(
            unknown, read_manifests(borg, repo, [r.name for r in unknown]), strict=True
        ):
            run.state = PARTIAL if manifest is not None and manifest.partial else COMPLETE
    return runs


def newest_complete(borg: Borg, repo: Repository) -> str | None:
    """The name of the newest complete run, reading manifests only where the comment does
    not tell; None when there is none."""
    for run in candidates(find(borg, repo), complete=True):
        if run.state == COMPLETE:
            return run.name
        (manifest,) = read_manifests(borg, repo, [run.name])
        if manifest is not None and not manifest.partial:
            return run.name
    return None
