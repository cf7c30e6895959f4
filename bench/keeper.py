#!/usr/bin/env python3
"""Benchmark: quiesce windows under borgmatic (hook mode, the gate keeper) against
`incus-borg backup`, on the same containers in one run.

Builds a private Incus (tests/harness) with `--instances` running containers on the `dir`
pool (freeze mode), each holding the small tree of bench/scale.py and `--unique-mb` MiB of
its own random data. Then, into fresh repositories, first and unchanged:

  backup     incus-borg backup --json: the run's time, each instance's freeze window
  borgmatic  borgmatic create with examples/borgmatic/config.yaml (its hooks run
             `incus-borg hook pre` and `hook post`): the run's time, each instance's
             freeze window from the gate keeper's record

and prints the total times, the longest and median freeze per instance, and the target: the
longest freeze under borgmatic within 1.2x of backup's. Everything is removed afterwards.

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

PHASES = ("first", "unchanged")
MAX_RATIO = 1.2  # longest freeze under borgmatic <= 1.2 x backup's


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
        backup = self.config("backup", instances=list(self.names), mode="freeze")
        for phase in PHASES:
            _, summary, _ = self.backup(f"backup-{phase}", f"incus-borg backup ({phase})", backup)
            found = instance_windows(summary)
            self.windows[f"backup {phase}"] = {n: [w] for n, (_, w) in found.items()}
        hooked = self.config("borgmatic", instances=list(self.names), mode="freeze")
        settings = self.borgmatic_settings(hooked)
        env = tool_env(hooked)
        argv = [str(Path(sys.executable).parent / "borgmatic"), "-c", str(settings)]
        self.runner.run([*argv, "repo-create", "--encryption", "repokey-blake2"], env=env)
        for phase in PHASES:
            with self.step(f"borgmatic-{phase}", f"borgmatic create ({phase})"):
                self.runner.run([*argv, "create"], env=env)
            self.windows[f"borgmatic {phase}"] = keeper_windows(hooked)

    def borgmatic_settings(self, config: Path) -> Path:
        """examples/borgmatic/config.yaml with this run's staging, repository and hooks."""
        root = config.parent
        repo = self.s.out / "repo-borgmatic-hooks"
        data = borgmatic_config(ROOT / "examples/borgmatic/config.yaml", root, repo, config)
        data["encryption_passphrase"] = PASSPHRASE
        path = root / "borgmatic.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def sections(self) -> list[str]:
        rows = []
        for key, per_name in self.windows.items():
            method, phase = key.split()
            longest = [max(w) for w in per_name.values() if w]
            run = self.measures[f"{method}-{phase}"].seconds
            rows.append(
                [
                    method,
                    phase,
                    secs(run, 2),
                    secs(max(longest, default=None), 2),
                    secs(statistics.median(longest) if longest else None, 2),
                    str(len(longest)),
                ]
            )
        headers = ["method", "run", "total", "longest freeze", "median freeze", "instances"]
        title = f"{len(self.names)} dir containers in freeze mode, one repository"
        return [self.headline(title), table(headers, rows)]

    def target_rows(self) -> list[tuple[str, str, bool]]:
        rows = []
        for phase in PHASES:
            ours = max(max(w) for w in self.windows[f"borgmatic {phase}"].values() if w)
            theirs = max(max(w) for w in self.windows[f"backup {phase}"].values() if w)
            rows.append(
                (
                    f"{phase}: longest freeze under borgmatic <= {MAX_RATIO} x backup's",
                    f"{ours:.2f} s vs {theirs:.2f} s = {ours / theirs:.2f}x",
                    ours <= MAX_RATIO * theirs,
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
