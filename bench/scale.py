#!/usr/bin/env python3
"""Benchmark: incus-borg with many instances.

Builds a private Incus (tests/harness) with `--instances` running containers on each pool
of `--pools` (`default` = dir, `fast` = btrfs), each holding the same small tree copied from
the host and `--unique-mb` MiB of its own random data. For each set (each pool's containers,
named in a configuration's `instances:`, and the whole server), into fresh repositories:

  plain    borg create of the Incus directory's server part plus the set's container
           directories: first, unchanged, after the change (the baseline)
  backup   incus-borg backup --json: first, unchanged, after changing 1% of the set's files;
           the archives each run made, the daemon's downtime, the quiesce windows
  list     incus-borg list latest

then restores each pool's first container from every set's last run and from a run holding
it alone, and reads a few freeze-mode containers alone with plain borg. Prints the figures
and the targets. Everything is removed afterwards, also on failure or Ctrl-C.

Run as root: python bench/scale.py [--instances N] (see bench/README.md)
"""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    POOLS,
    SHARED_TREES,
    Bench,
    Column,
    GiB,
    Measure,
    MiB,
    Sizes,
    change_files,
    columns,
    container_dir,
    fill_small,
    human,
    incus_borg_argv,
    instance_windows,
    main,
    pool_kinds,
    positive,
    rootfs,
    run_archives,
    secs,
    tree_size,
)

PHASES = ("first", "unchanged", "changed")
CHANGED_FRACTION = 0.01

# Targets from the issue.
PER_INSTANCE = 0.05  # unchanged <= plain unchanged + daemon downtime + 0.05 s x N
MAX_FIRST_RATIO = 1.3  # first <= 1.3 x plain first
MAX_ARCHIVES = 2  # archives per run and repository
MAX_FREEZE_RATIO = 1.2  # freeze window <= 1.2 x borg's read of that instance alone
MAX_SNAPSHOT_WINDOW = 0.1  # seconds
MAX_RESTORE_RATIO = 1.2  # restore from the N-instance run <= 1.2 x from a run of it alone


@dataclass
class Group:
    """A set of containers backed up together: one pool's, or the whole server's."""

    label: str
    names: dict[str, str]  # container -> pool
    config: Path = Path()
    runs: dict[str, str] = field(default_factory=dict)  # phase -> incus-borg run name


class ScaleBench(Bench):
    """Many instances: backup, archives, windows, restore and list against plain borg."""

    name = "scale.py"
    description = (
        "Benchmark incus-borg with many running containers per pool against plain borg. Needs root."
    )
    epilog = f"Every container holds {', '.join(SHARED_TREES)} (copied from the host)."
    options = (
        ("--instances", positive(int), 40, "containers per pool"),
        ("--pools", pool_kinds, "dir,btrfs", "pool kinds, comma-separated"),
        ("--unique-mb", positive(float), 4.0, "MiB of unique data per container"),
        ("--alone", positive(int), 3, "freeze-mode containers read alone by plain borg"),
        ("--jobs", positive(int), 4, "containers launched at a time"),
    )

    @classmethod
    def sizes(cls, args: Any) -> Sizes:
        data = int(args.instances * len(args.pools) * (4 * MiB + args.unique_mb * MiB))
        btrfs = max(2, math.ceil(3 * data / GiB))  # the containers, snapshots, restored copies
        return Sizes(8 * data + 2 * GiB, 3 * data + (btrfs + 4) * GiB, f"{btrfs}GiB")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        pools = {kind: POOLS[kind] for kind in self.args.pools}
        per_pool = range(1, self.args.instances + 1)
        self.groups = [
            Group(kind, {f"s-{kind}-{i}": pool for i in per_pool}) for kind, pool in pools.items()
        ]
        everything = {n: p for g in self.groups for n, p in g.names.items()}
        self.groups.append(Group("server", everything))
        self.data = self.files = 0
        self.alone: dict[str, tuple[float, float]] = {}  # freeze-mode container -> reads

    def build(self) -> None:
        """Launch and fill every container, `--jobs` at a time."""
        unique = self.args.unique_mb
        names = self.groups[-1].names
        self.launch(names, lambda n, root: fill_small(root, unique), jobs=self.args.jobs)
        for name, pool in names.items():
            size, count = tree_size(container_dir(self.server, pool, name))
            self.data, self.files = self.data + size, self.files + count

    def run(self) -> None:
        """Every set's runs, the restores, the freeze-mode containers read alone."""
        for n, group in enumerate(self.groups):
            self.measure_group(group, seed=n)
        for group in self.groups[:-1]:
            self.restores(next(iter(group.names)))
        freeze = [n for n, p in self.groups[-1].names.items() if p == POOLS["dir"]]
        for name in freeze[: self.args.alone]:
            self.alone[name] = self.read_alone(POOLS["dir"], name)

    def measure_group(self, group: Group, seed: int) -> None:
        """Plain borg and incus-borg, first, unchanged and changed; then `list latest`."""
        label = group.label
        plain = self.s.out / f"repo-plain-{label}"
        self.borg_init(plain)
        paths = self.plain_paths(group.names)
        instances = [] if label == "server" else list(group.names)
        group.config = self.config(label, instances=instances)
        for phase in PHASES:
            if phase == "changed":
                roots = [rootfs(self.server, p, n) for n, p in group.names.items()]
                change_files(roots, CHANGED_FRACTION, seed)
            what = f"plain borg create, {label} set ({phase})"
            self.borg_create(f"{label}-plain-{phase}", what, plain, paths)
            self.incus_borg_backup(group, phase)
        shutil.rmtree(plain)
        with self.step(f"{label}-list", "incus-borg list latest"):
            self.runner.run(incus_borg_argv(group.config, "list", "latest"))

    def incus_borg_backup(self, group: Group, phase: str) -> None:
        """One incus-borg run of a set, and how many archives it made."""
        key = f"{group.label}-backup-{phase}"
        what = f"incus-borg backup, {group.label} set ({phase})"
        m, summary, _ = self.backup(key, what, group.config)
        group.runs[phase] = summary["run"]
        listing = self.borg("list", "--json", str(self.s.out / f"repo-{group.label}")).stdout
        m.data["archives"] = len(run_archives(listing, summary["run"]))

    def restores(self, name: str) -> None:
        """Restore `name` from a run holding it alone, then from every set's last run."""
        new = f"{name}-copy"
        alone = self.config(f"{name}-alone")
        what = f"incus-borg backup --instance {name} (alone)"
        _, summary, _ = self.backup(f"alone-{name}", what, alone, "--instance", name)
        self.restore(f"restore-{name}-alone", alone, summary["run"], name, new)
        self.delete(new)
        for group in self.groups:
            if name in group.names:
                key = f"restore-{name}-{group.label}"
                self.restore(key, group.config, group.runs["changed"], name, new)
                self.delete(new)

    # -- figures --

    def run_measure(self, group: Group, phase: str, kind: str = "backup") -> Measure:
        """The measure of one run of a set (`backup` or `plain`)."""
        return self.measures[f"{group.label}-{kind}-{phase}"]

    def windows(self, group: Group, phase: str, mode: str) -> dict[str, float]:
        """Container -> quiesce window in one run of a set, for windows of `mode`."""
        summary = self.run_measure(group, phase).data["summary"]
        return {n: w for n, (md, w) in instance_windows(summary).items() if md == mode}

    def restore_pairs(self) -> Iterator[tuple[str, Group]]:
        """(container, set) of every restore from a set's run."""
        for name in (next(iter(g.names)) for g in self.groups[:-1]):
            yield from ((name, g) for g in self.groups if name in g.names)

    def restore_ratio(self, name: str, group: Group) -> float:
        """Restoring `name` from the set's run against from its run alone."""
        ms = self.measures
        return ms[f"restore-{name}-{group.label}"].seconds / ms[f"restore-{name}-alone"].seconds

    # -- the report --

    def sections(self) -> list[str]:
        """Headline, runs, restores, reads alone."""
        a = self.args
        title = (
            f"incus-borg scale benchmark: {a.instances} containers on each of "
            f"{', '.join(a.pools)} ({a.unique_mb:g} MiB unique each)"
        )
        return [
            self.headline(title, f"instance data {human(self.data)} in {self.files} files"),
            self.run_table(),
            self.restore_table(),
            "freeze-mode containers read by plain borg alone (s):\n" + self.alone_table(),
        ]

    def run_table(self) -> str:
        """One row per set and phase: plain borg against incus-borg."""

        def top(r: tuple[Group, str], mode: str) -> str:
            return secs(max(self.windows(*r, mode).values(), default=None), 2)

        m = self.run_measure
        spec: list[Column] = [
            ("set", lambda r: r[0].label),
            ("N", lambda r: len(r[0].names)),
            ("run", lambda r: r[1]),
            ("plain s", lambda r: secs(m(r[0], r[1], "plain").seconds)),
            ("incus-borg s", lambda r: secs(m(*r).seconds)),
            ("added", lambda r: human(m(*r).added)),
            ("archives", lambda r: m(*r).data["archives"]),
            ("daemon down s", lambda r: secs(m(*r).data["summary"]["daemon_downtime"], 2)),
            ("max freeze s", lambda r: top(r, "freeze")),
            ("max snapshot s", lambda r: top(r, "snapshot")),
        ]
        lists = (f"{g.label} {self.measures[g.label + '-list'].seconds:.1f} s" for g in self.groups)
        table = columns(spec, [(g, p) for g in self.groups for p in PHASES])
        return table + "\nincus-borg list latest: " + ", ".join(lists)

    def restore_table(self) -> str:
        """Each restore from a set's run against from the run holding the container alone."""
        ms = self.measures
        spec: list[Column] = [
            ("restored", lambda r: r[0]),
            ("from the run of", lambda r: f"{r[1].label} set ({len(r[1].names)})"),
            ("restore s", lambda r: secs(ms[f"restore-{r[0]}-{r[1].label}"].seconds)),
            ("from its run alone s", lambda r: secs(ms[f"restore-{r[0]}-alone"].seconds)),
            ("ratio", lambda r: f"{self.restore_ratio(*r):.2f}"),
        ]
        return columns(spec, self.restore_pairs())

    def alone_table(self) -> str:
        """The freeze-mode containers read alone, first and unchanged."""
        spec: list[Column] = [
            ("container", lambda n: n),
            ("borg alone", lambda n: secs(self.alone[n][0], 2)),
            ("again", lambda n: secs(self.alone[n][1], 2)),
        ]
        return columns(spec, self.alone)

    def target_rows(self) -> Iterator[tuple[str, str, bool]]:
        """The issue's targets next to the figures."""
        for g in self.groups:
            yield from self.group_targets(g)
        yield from self.freeze_targets()
        for g in self.groups:
            snaps = [(w, n, p) for p in PHASES for n, w in self.windows(g, p, "snapshot").items()]
            if snaps:
                w, n, p = max(snaps)
                target = f"{g.label}: snapshot windows < {MAX_SNAPSHOT_WINDOW} s"
                yield target, f"max {w:.2f} s ({n}, {p})", w < MAX_SNAPSHOT_WINDOW
        for name, g in self.restore_pairs():
            r = self.restore_ratio(name, g)
            target = f"{g.label}: restore {name} <= {MAX_RESTORE_RATIO} x from its run alone"
            yield target, f"{r:.2f}", r <= MAX_RESTORE_RATIO

    def group_targets(self, g: Group) -> Iterator[tuple[str, str, bool]]:
        """A set's unchanged run, first run and archives per run."""
        n, m = len(g.names), self.run_measure
        down = m(g, "unchanged").data["summary"]["daemon_downtime"] or 0.0
        limit = m(g, "unchanged", "plain").seconds + down + PER_INSTANCE * n
        took = m(g, "unchanged").seconds
        target = f"{g.label}: unchanged <= plain + daemon down + {PER_INSTANCE} s x {n}"
        yield target, f"{took:.1f} s vs {limit:.1f} s", took <= limit
        r = m(g, "first").seconds / m(g, "first", "plain").seconds
        yield f"{g.label}: first <= {MAX_FIRST_RATIO} x plain", f"{r:.2f}", r <= MAX_FIRST_RATIO
        most = max(m(g, p).data["archives"] for p in PHASES)
        target = f"{g.label}: archives per run and repository <= {MAX_ARCHIVES}"
        yield target, f"{most}", most <= MAX_ARCHIVES

    def freeze_targets(self) -> Iterator[tuple[str, str, bool]]:
        """The worst freeze window against borg's read alone, per set and run (first against
        the first read, unchanged against the unchanged read)."""
        for g in self.groups:
            for phase, read in (("first", 0), ("unchanged", 1)):
                windows = self.windows(g, phase, "freeze")
                ratios = [
                    (w / self.alone[n][read], n) for n, w in windows.items() if n in self.alone
                ]
                if ratios:
                    r, n = max(ratios)
                    target = f"{g.label} {phase}: freeze windows <= {MAX_FREEZE_RATIO} x alone"
                    yield target, f"worst {n} {r:.2f}", r <= MAX_FREEZE_RATIO

    def raw(self) -> dict[str, Any]:
        """Everything measured, for --json."""
        return {
            **super().raw(),
            "data": self.data,
            "files": self.files,
            "groups": [asdict(g) for g in self.groups],
            "alone": self.alone,
        }


if __name__ == "__main__":
    sys.exit(main(ScaleBench))
