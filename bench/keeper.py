#!/usr/bin/env python3
"""Benchmark: quiesce windows under borgmatic (hook mode, the gate keeper) against
`incus-borg backup`, on the same containers in one run.

Builds a private Incus (tests/harness) with `--instances` running containers on the `dir`
pool (freeze mode), each holding the small tree of bench/scale.py and `--unique-mb` MiB of
its own random data. Then, into fresh repositories, a first run and `--rounds` unchanged
ones of each, the order alternating:

  backup     incus-borg backup --json: the run's time, each instance's freeze window
  borgmatic  borgmatic create with examples/borgmatic/config.yaml (its hooks run
             `incus-borg hook pre` and `hook post`): the run's time, each instance's
             freeze window from the gate keeper's record

and prints the total times, the longest and median freeze per instance, and the targets: the
longest (and the 90th percentile) freeze under borgmatic within 1.2x of backup's. Everything is removed afterwards.

Run as root: python bench/keeper.py [--instances N] (see bench/README.md)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml
from benchlib import (
    POOLS,
    Bench,
    GiB,
    MiB,
    Sizes,
    instance_windows,
    main,
    positive,
    secs,
    table,
)
from cli import PASSPHRASE, ROOT, borgmatic_config, tool_env
from scale import fill

from incus_borg.backup.keeper import record_path

MAX_RATIO = 1.2  # longest freeze under borgmatic <= 1.2 x backup's
SLOW = 0.9  # seconds: a window this long holds liblxc's one-second freezer sleep


def p90(values: list[float]) -> float:
    """The 90th percentile."""
    return statistics.quantiles(values, n=10)[-1]


class KeeperBench(Bench):
    """Freeze windows and run times: borgmatic's hook mode against incus-borg backup."""

    name = "keeper.py"
    description = (
        "Benchmark the freeze windows under borgmatic (hook mode) against incus-borg backup, "
        "on many running dir containers. Needs root."
    )
    options = (
        ("--instances", positive(int), 40, "containers on the dir pool"),
        ("--unique-mb", positive(float), 4.0, "MiB of unique data per container"),
        ("--jobs", positive(int), 4, "containers launched at a time"),
        ("--rounds", positive(int), 3, "unchanged runs of each method after the first"),
    )

    @classmethod
    def sizes(cls, args: Any) -> Sizes:
        data = int(args.instances * (4 * MiB + args.unique_mb * MiB))
        return Sizes(6 * data + 2 * GiB, 3 * data + 4 * GiB, "2GiB")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.names = {f"k-{i}": POOLS["dir"] for i in range(1, self.args.instances + 1)}
        self.windows: dict[str, dict[str, list[float]]] = {}  # "method phase" -> name -> windows

    def build(self) -> None:
        unique = self.args.unique_mb
        self.launch(self.names, lambda n, root: fill(root, unique), jobs=self.args.jobs)

    def run(self) -> None:
        """A first run of each method, then `--rounds` unchanged ones, the order alternating."""
        backup = self.config("backup", instances=list(self.names), mode="freeze")
        hooked = self.config("borgmatic", instances=list(self.names), mode="freeze")
        settings = self.borgmatic_settings(hooked)
        env = tool_env(hooked)
        argv = [str(Path(sys.executable).parent / "borgmatic"), "-c", str(settings)]
        self.runner.run([*argv, "repo-create", "--encryption", "repokey-blake2"], env=env)
        phases = ["first", *(f"unchanged{n}" for n in range(1, self.args.rounds + 1))]
        for n, phase in enumerate(phases):
            for method in ("backup", "borgmatic")[:: 1 if n % 2 == 0 else -1]:
                key = f"{method} {phase}"
                if method == "backup":
                    _, summary, _ = self.backup(key, f"incus-borg backup ({phase})", backup)
                    found = instance_windows(summary)
                    self.windows[key] = {name: [w] for name, (_, w) in found.items()}
                    continue
                with self.step(key, f"borgmatic create ({phase})"):
                    self.runner.run([*argv, "create"], env=env)
                self.windows[key] = keeper_windows(hooked)

    def borgmatic_settings(self, config: Path) -> Path:
        """examples/borgmatic/config.yaml with this run's staging, repository and hooks."""
        root = config.parent
        repo = self.s.out / "repo-borgmatic-hooks"
        data = borgmatic_config(ROOT / "examples/borgmatic/config.yaml", root, repo, config)
        data["encryption_passphrase"] = PASSPHRASE
        path = root / "borgmatic.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def all_windows(self, method: str, first: bool) -> list[float]:
        """Every freeze window of `method`'s first run, or of its unchanged runs."""
        return [
            w
            for key, per_name in self.windows.items()
            if key.split()[0] == method and (key.split()[1] == "first") == first
            for windows in per_name.values()
            for w in windows
        ]

    def sections(self) -> list[str]:
        rows = []
        for key, per_name in self.windows.items():
            longest = [max(w) for w in per_name.values() if w]
            rows.append(
                [
                    *key.split(),
                    secs(self.measures[key].seconds, 2),
                    secs(max(longest, default=None), 2),
                    secs(statistics.median(longest) if longest else None, 2),
                    str(sum(1 for w in longest if w >= SLOW)),
                    str(len(longest)),
                ]
            )
        headers = ["method", "run", "total", "longest", "median", f">= {SLOW} s", "instances"]
        title = f"{len(self.names)} dir containers in freeze mode, one repository"
        note = (
            f"freeze windows per instance; a window of {SLOW} s or more is liblxc's cgroup-v1 "
            "freezer sleeping a second before it looks again (Incus's own freeze, either way)"
        )
        return [self.headline(title, note), table(headers, rows)]

    def target_rows(self) -> list[tuple[str, str, bool]]:
        rows = []
        for first, label in ((True, "first run"), (False, "unchanged runs")):
            ours = self.all_windows("borgmatic", first)
            theirs = self.all_windows("backup", first)
            for what, pick in (("longest", max), ("p90", p90)):
                a, b = pick(ours), pick(theirs)
                rows.append(
                    (
                        f"{label}: {what} freeze under borgmatic <= {MAX_RATIO} x backup's",
                        f"{a:.2f} s vs {b:.2f} s = {a / b:.2f}x",
                        a <= MAX_RATIO * b,
                    )
                )
        return rows

    def raw(self) -> dict[str, Any]:
        return {**super().raw(), "windows": self.windows}


def keeper_windows(config: Path) -> dict[str, list[float]]:
    """Instance name -> its freeze windows, from the last gate keeper's record."""
    staging = Path(yaml.safe_load(config.read_text())["staging_dir"])
    found: dict[str, list[float]] = {}
    for line in record_path(staging).read_text().splitlines():
        ((kind, fields),) = json.loads(line).items()
        if kind == "window":
            found.setdefault(fields["ref"].split("/")[-1], []).append(fields["length"])
    return found


if __name__ == "__main__":
    sys.exit(main(KeeperBench))
