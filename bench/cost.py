#!/usr/bin/env python3
"""Benchmark: what a run, a restore and `list latest` cost, against plain borg and `incus import`.

Builds a private Incus (tests/harness) with `--instances` running containers on each pool of
`--pools` (`default` = dir, `fast` = btrfs), each holding the same small tree copied from the
host and `--unique-mb` MiB of its own random data. For each pool's set, into fresh
repositories, side by side:

  plain     borg create of the Incus directory's server part plus the set's container
            directories: first, then unchanged (`--repeat` times)
  backup    incus-borg backup --json (its profile is in the JSON): first, then unchanged
            (`--repeat` times, alternating with plain)
  list      incus-borg list latest (`--repeat` times)
  restore   the set's first container: `incus import` of its `incus export` file against
            `incus-borg restore instance RUN NAME --as NEW` (`--repeat` times each, alternating)

then the growth line: the unchanged run of `--growth-pool`'s containers at each count of
`--growth` (more containers are launched as needed), against plain borg's. Prints the
figures, the profiles and the targets of issue 26. Everything is removed afterwards.

Run as root: python bench/cost.py [--instances N] [--growth 10,40,160] (see bench/README.md)
"""

from __future__ import annotations

import math
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    POOLS,
    Bench,
    BenchError,
    GiB,
    MiB,
    Sizes,
    fill_small,
    incus_borg_argv,
    main,
    pool_kinds,
    positive,
    secs,
    table,
)

# Issue 26's targets.
UNCHANGED_FIXED, UNCHANGED_PER_INSTANCE = 1.5, 0.02  # <= plain + 1.5 s + 0.02 s x N
FIRST_RATIO, FIRST_FIXED = 1.3, 1.5  # first <= 1.3 x plain + 1.5 s
RESTORE_RATIO, RESTORE_FIXED = 1.3, 0.8  # restore <= 1.3 x incus import + 0.8 s
LIST_LATEST = 0.5  # seconds
# liblxc's cgroup-v1 freezer sleeps a whole second when a freeze does not complete at once:
# a window this long is one such sleep (shown apart: no freeze on a cgroup-v2 host has it).
FREEZER_SLEEP = 0.9


def counts(text: str) -> list[int]:
    """`10,40,160` -> [10, 40, 160]."""
    try:
        found = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise BenchError(f"--growth {text!r}: give instance counts such as 10,40,160") from None
    if not found or found[0] < 1:
        raise BenchError(f"--growth {text!r}: give instance counts such as 10,40,160")
    return found


@dataclass
class Set:
    """One pool's containers and what was measured of them."""

    kind: str
    names: dict[str, str]  # container -> pool
    plain: dict[str, list[float]] = field(default_factory=dict)  # first / unchanged -> seconds
    backup: dict[str, list[float]] = field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # first / unchanged
    slept: dict[str, list[float]] = field(default_factory=dict)  # each run's freezer sleeps
    listing: list[float] = field(default_factory=list)
    imports: list[float] = field(default_factory=list)
    restores: list[float] = field(default_factory=list)
    restore_profile: str = ""


def median(values: list[float]) -> float:
    """The median of some measurements."""
    return statistics.median(values)


def sleeps(summary: dict[str, Any]) -> list[float]:
    """The freeze windows of a run that hold one of liblxc's freezer sleeps."""
    return [
        float(i["window"])
        for i in summary["items"]
        if i["mode"] == "freeze" and (i["window"] or 0) >= FREEZER_SLEEP
    ]


class CostBench(Bench):
    """Runs, restores and listings against plain borg and incus import; the growth line."""

    name = "cost.py"
    description = "Benchmark what incus-borg costs against plain borg and incus import. Root."
    options = (
        ("--instances", positive(int), 40, "containers per pool"),
        ("--pools", pool_kinds, "dir,btrfs", "pool kinds, comma-separated"),
        ("--unique-mb", positive(float), 4.0, "MiB of unique data per container"),
        ("--repeat", positive(int), 3, "unchanged runs, listings, restores and imports each"),
        ("--growth", counts, "10,40,160", "instance counts of the growth line"),
        ("--growth-pool", str, "btrfs", "pool kind of the growth line (dir or btrfs)"),
        ("--jobs", positive(int), 4, "containers launched at a time"),
    )

    @classmethod
    def sizes(cls, args: Any) -> Sizes:
        """Room for every container (the growth line's too), snapshots and restored copies."""
        most = args.instances * len(args.pools) + max(args.growth)
        data = int(most * (4 * MiB + args.unique_mb * MiB))
        btrfs = max(2, math.ceil(3 * data / GiB))
        return Sizes(8 * data + 2 * GiB, 3 * data + (btrfs + 4) * GiB, f"{btrfs}GiB")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        if self.args.growth_pool not in POOLS:
            raise BenchError(f"--growth-pool {self.args.growth_pool!r}: dir or btrfs")
        per_pool = range(1, self.args.instances + 1)
        self.sets = [
            Set(kind, {f"c-{kind}-{i}": POOLS[kind] for i in per_pool}) for kind in self.args.pools
        ]
        self.growth: list[tuple[int, float, float]] = []  # N, plain, incus-borg (unchanged)

    def build(self) -> None:
        """Launch and fill every set's containers."""
        names = {n: p for s in self.sets for n, p in s.names.items()}
        unique = self.args.unique_mb
        self.launch(names, lambda n, root: fill_small(root, unique), jobs=self.args.jobs)

    def run(self) -> None:
        """Each set's measurements, then the growth line."""
        for s in self.sets:
            self.measure_set(s)
        self.measure_growth()

    # -- the measurements --

    def runs(self, label: str, names: dict[str, str]) -> tuple[Path, Path, list[str]]:
        """A fresh incus-borg configuration for `names`, a fresh plain repository and the
        paths plain borg reads."""
        config = self.config(label, instances=list(names))
        plain = self.s.out / f"repo-plain-{label}"
        if plain.exists():
            shutil.rmtree(plain)
        self.borg_init(plain)
        return config, plain, self.plain_paths(names)

    def pair(
        self, key: str, config: Path, plain: Path, paths: list[str]
    ) -> tuple[float, float, dict[str, Any]]:
        """Plain borg, then incus-borg, once each: their seconds and incus-borg's summary."""
        p = self.borg_create(f"{key}-plain", f"plain borg create ({key})", plain, paths).seconds
        m, summary, _ = self.backup(f"{key}-backup", f"incus-borg backup ({key})", config)
        return p, m.seconds, summary

    def measure_set(self, s: Set) -> None:
        """A set's first and unchanged runs beside plain borg, `list latest`, a restore."""
        config, plain, paths = self.runs(s.kind, s.names)
        for phase, rounds in (("first", 1), ("unchanged", self.args.repeat)):
            for n in range(rounds):
                p, b, summary = self.pair(f"{s.kind}-{phase}-{n}", config, plain, paths)
                s.plain.setdefault(phase, []).append(p)
                s.backup.setdefault(phase, []).append(b)
                s.slept.setdefault(phase, []).append(sum(sleeps(summary)))
                s.summaries[phase] = summary
        run = s.summaries["unchanged"]["run"]
        for n in range(self.args.repeat):
            s.listing.append(self.timed(f"{s.kind}-list-{n}", config, "list", "latest"))
        self.measure_restore(s, config, run)
        shutil.rmtree(plain)

    def timed(self, key: str, config: Path, *args: str) -> float:
        """Seconds one incus-borg command takes."""
        with self.step(key, "incus-borg " + " ".join(args)):
            done = self.runner.run(incus_borg_argv(config, *args), env=self.daemon.env)
        return done.seconds

    def measure_restore(self, s: Set, config: Path, run: str) -> None:
        """`incus import` of an export file against `restore instance`, alternating."""
        name = next(iter(s.names))
        tarball = self.s.out / f"{name}.tar"
        self.daemon.incus("export", name, str(tarball), "--compression", "none", timeout=600)
        new = f"{name}-copy"
        restore = ["restore", "instance", run, name, "--as", new]
        for n in range(self.args.repeat):
            with self.step(f"{s.kind}-import-{n}", f"incus import of {name}"):
                done = self.runner.run(["incus", "import", str(tarball), new], env=self.daemon.env)
            s.imports.append(done.seconds)
            self.delete(new)
            s.restores.append(self.timed(f"{s.kind}-restore-{n}", config, *restore))
            self.delete(new)
        argv = incus_borg_argv(config, "--profile", *restore)
        profiled = self.runner.run(argv, env=self.daemon.env, ok=(0, 2))
        if profiled.returncode == 0:
            s.restore_profile = profiled.stderr[profiled.stderr.index("phase ") :]
            self.delete(new)
        else:  # such as an incus-borg without --profile
            s.restore_profile = "(none: " + profiled.stderr.strip().splitlines()[-1] + ")"
        tarball.unlink()

    def measure_growth(self) -> None:
        """The unchanged run at each count of --growth, on one pool."""
        kind = self.args.growth_pool
        pool = POOLS[kind]
        have = [n for s in self.sets if s.kind == kind for n in s.names]
        wanted = max(self.args.growth)
        more = {f"g-{kind}-{i}": pool for i in range(len(have) + 1, wanted + 1)}
        unique = self.args.unique_mb
        self.launch(more, lambda n, root: fill_small(root, unique), jobs=self.args.jobs)
        every = have + list(more)
        for count in self.args.growth:
            names = {n: pool for n in every[:count]}
            config, plain, paths = self.runs(f"growth-{count}", names)
            self.pair(f"growth-{count}-first", config, plain, paths)
            rounds = [
                self.pair(f"growth-{count}-{n}", config, plain, paths)
                for n in range(self.args.repeat)
            ]
            self.growth.append(
                (count, median([r[0] for r in rounds]), median([r[1] for r in rounds]))
            )
            shutil.rmtree(plain)

    # -- the report --

    def sections(self) -> list[str]:
        """Headline, runs, restores and listings, profiles, the growth line."""
        a = self.args
        title = (
            f"incus-borg cost benchmark: {a.instances} containers on each of {', '.join(a.pools)} "
            f"({a.unique_mb:g} MiB unique each), medians of {a.repeat}"
        )
        return [
            self.headline(title),
            self.run_table(),
            self.other_table(),
            *(self.profiles(s) for s in self.sets),
            self.growth_table(),
        ]

    def run_table(self) -> str:
        """One row per set and run: plain borg against incus-borg (medians)."""
        rows = []
        for s in self.sets:
            for phase in ("first", "unchanged"):
                ours = median(s.backup[phase])
                less = median([b - z for b, z in zip(s.backup[phase], s.slept[phase], strict=True)])
                rows.append(
                    [
                        s.kind,
                        len(s.names),
                        phase,
                        secs(median(s.plain[phase]), 2),
                        secs(ours, 2),
                        f"{ours - median(s.plain[phase]):.2f}",
                        secs(s.summaries[phase]["daemon_downtime"], 2),
                        f"{median(s.slept[phase]):.1f}",
                        secs(less, 2),
                    ]
                )
        head = ["set", "N", "run", "plain s", "incus-borg s", "extra s", "daemon down s"]
        return table([*head, "freezer sleeps s", "less sleeps s"], rows)

    def other_table(self) -> str:
        """Per set: incus import against restore instance, and list latest (medians)."""
        rows = [
            [
                s.kind,
                secs(median(s.imports), 2),
                secs(median(s.restores), 2),
                secs(median(s.listing), 2),
            ]
            for s in self.sets
        ]
        head = ["set", "incus import s", "restore instance s", "list latest s"]
        return "restoring one instance of the set, and `list latest`:\n" + table(head, rows)

    def profiles(self, s: Set) -> str:
        """The top phases of the set's last first and unchanged runs, and a restore's profile."""
        lines = [f"where the time goes, {s.kind} set (wall s, top-level phases and the read's):"]
        for phase in ("first", "unchanged"):
            profile = s.summaries[phase].get("profile", {})
            shown = [
                f"{path} {p['wall']:.2f}"
                for path, p in profile.items()
                if "/" not in path or path.startswith(("read/", "capture/daemon down"))
                if "/incus API" not in path and p["wall"] >= 0.01
            ]
            lines.append(f"  {phase}: " + ", ".join(shown))
        lines.append(
            "  restore instance --profile:\n    " + s.restore_profile.replace("\n", "\n    ")
        )
        return "\n".join(lines)

    def growth_table(self) -> str:
        """The unchanged run at each count, and what each added instance costs."""
        rows = []
        previous: tuple[int, float, float] | None = None
        for count, plain, ours in self.growth:
            slope = "-"
            if previous is not None:
                extra = (ours - plain) - (previous[2] - previous[1])
                slope = f"{extra / (count - previous[0]) * 1000:.1f} ms"
            rows.append([count, secs(plain, 2), secs(ours, 2), f"{ours - plain:.2f}", slope])
            previous = (count, plain, ours)
        head = [
            "N",
            "plain unchanged s",
            "incus-borg unchanged s",
            "extra s",
            "extra per added instance",
        ]
        return f"growth of the unchanged run ({self.args.growth_pool}):\n" + table(head, rows)

    def target_rows(self) -> list[tuple[str, str, bool]]:
        """Issue 26's targets next to the figures."""
        rows = []
        for s in self.sets:
            n = len(s.names)
            unchanged = UNCHANGED_FIXED, UNCHANGED_PER_INSTANCE
            limits = {
                "unchanged": median(s.plain["unchanged"]) + unchanged[0] + unchanged[1] * n,
                "first": FIRST_RATIO * median(s.plain["first"]) + FIRST_FIXED,
            }
            names = {
                "unchanged": f"unchanged <= plain + {unchanged[0]} s + {unchanged[1]} s x {n}",
                "first": f"first <= {FIRST_RATIO} x plain + {FIRST_FIXED} s",
            }
            for phase, limit in limits.items():
                ours = median(s.backup[phase])
                figure = f"{ours:.2f} s vs {limit:.2f} s"
                if median(s.slept[phase]):
                    less = [b - z for b, z in zip(s.backup[phase], s.slept[phase], strict=True)]
                    figure += f" ({median(less):.2f} s less freezer sleeps)"
                rows.append((f"{s.kind}: {names[phase]}", figure, ours <= limit))
            imp, ours = median(s.imports), median(s.restores)
            limit = RESTORE_RATIO * imp + RESTORE_FIXED
            target = f"{s.kind}: restore <= {RESTORE_RATIO} x incus import + {RESTORE_FIXED} s"
            rows.append((target, f"{ours:.2f} s vs {limit:.2f} s", ours <= limit))
            ours = median(s.listing)
            target = f"{s.kind}: list latest <= {LIST_LATEST} s"
            rows.append((target, f"{ours:.2f} s", ours <= LIST_LATEST))
        return rows

    def raw(self) -> dict[str, Any]:
        """Everything measured, for --json."""
        return {
            **super().raw(),
            "sets": [vars(s) for s in self.sets],
            "growth": self.growth,
        }


if __name__ == "__main__":
    sys.exit(main(CostBench))
