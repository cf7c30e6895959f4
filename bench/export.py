#!/usr/bin/env python3
"""Benchmark: the export reader against `incus export` and `incus import`.

Builds a private Incus (tests/harness) with one container per pool (`default` = dir, `fast` =
btrfs), each holding `--size-mb` MiB of files (half random, half 4:1 compressible) and read
through Incus's export (`user.incus-borg.mode=export`). It measures, side by side in one run:
(a) `incus export NAME FILE --compression none` of each container plus `borg create` of the
files into a fresh repository, (b) `incus-borg backup`, then both again unchanged (c, d),
and (e) `incus import` of one exported file against (f) `incus-borg restore instance`.
Targets: b <= 1.0 x a; d <= 0.8 x c, and d adds < 1% of the data; f <= 1.3 x e.

Run as root: python bench/export.py [--size-mb N] (see bench/README.md)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from benchlib import (
    Column,
    MiB,
    PerPoolBench,
    columns,
    compressible,
    human,
    main,
    positive,
    secs,
    write_blob,
)

FIRST, UNCHANGED, RESTORE, ADDED = 1.0, 0.8, 1.3, 0.01


class ExportBench(PerPoolBench):
    """Backups and a restore through Incus's export, against incus export/import."""

    name = "export.py"
    description = "The export reader against `incus export` + borg and `incus import`. Needs root."
    options = (("--size-mb", positive(int), 300, "MiB of files per container"),)
    prefix = "exp"
    copies = 3

    def fill(self, root: Path) -> None:
        """`--size-mb` files of 1 MiB in /root/data: half random, half compressible."""
        for i in range(1, self.args.size_mb + 1):
            make = os.urandom if i % 2 else compressible
            write_blob(root / "root" / "data" / f"f{i}", MiB, make)

    def build(self) -> None:
        """The containers, each read through Incus's export."""
        super().build()
        for name in self.names:
            self.daemon.incus("config", "set", name, "user.incus-borg.mode=export")

    def export_and_borg(self, key: str, what: str, repo: Path) -> None:
        """`incus export` of every container to a file, then `borg create` of those files."""
        files = self.s.out / "exports"
        files.mkdir(exist_ok=True)
        with self.step(key, what) as m:
            for name in self.names:
                target = files / f"{name}.tar"
                target.unlink(missing_ok=True)
                self.runner.run(
                    ["incus", "export", name, str(target), "--compression", "none"],
                    env=self.daemon.env,
                )
            done = self.borg("create", "--json", f"{repo}::{key}", str(files))
        m.added = int(json.loads(done.stdout)["archive"]["stats"]["deduplicated_size"])

    def run(self) -> None:
        """The two rounds of backups, then the restores."""
        repo = self.s.out / "repo-export-baseline"
        self.borg_init(repo)
        config = self.config("export", instances=list(self.names))
        self.export_and_borg("a", "incus export + borg create", repo)
        _, summary, _ = self.backup("b", "incus-borg backup", config)
        self.export_and_borg("c", "incus export + borg create, unchanged", repo)
        self.backup("d", "incus-borg backup, unchanged", config)
        name = next(iter(self.names))
        tarball = self.s.out / "exports" / f"{name}.tar"
        with self.step("e", f"incus import of {name}"):
            self.runner.run(["incus", "import", str(tarball), "exp-imported"], env=self.daemon.env)
        self.delete("exp-imported")
        self.restore("f", config, str(summary["run"]), name, "exp-restored")
        self.delete("exp-restored")

    def sections(self) -> list[str]:
        """Headline and the steps."""
        spec: list[Column] = [
            ("step", lambda m: f"{m.key}: {m.what}"),
            ("wall s", lambda m: secs(m.seconds)),
            ("added", lambda m: human(m.added) if m.added is not None else "-"),
        ]
        title = f"export benchmark: {human(self.data)} in {len(self.names)} containers"
        return [self.headline(title), columns(spec, self.measures.values())]

    def target_rows(self) -> list[tuple[str, str, bool]]:
        """The ratios against the baselines of the same run."""
        t = {k: m.seconds for k, m in self.measures.items()}
        added = (self.measures["d"].added or 0) / self.data
        rows = [
            ("first run <= 1.0 x incus export + borg", t["b"] / t["a"], FIRST),
            ("unchanged run <= 0.8 x the same, unchanged", t["d"] / t["c"], UNCHANGED),
            ("restore <= 1.3 x incus import", t["f"] / t["e"], RESTORE),
        ]
        found = [(what, f"{ratio:.2f}", ratio <= limit) for what, ratio, limit in rows]
        return [*found, ("unchanged run adds < 1% of the data", f"{added:.3%}", added < ADDED)]


if __name__ == "__main__":
    sys.exit(main(ExportBench))
