#!/usr/bin/env python3
"""Benchmark: what a second, unchanged run sends to an SSH repository.

Builds a private Incus (tests/harness) with one container per pool (`default` = dir, `fast` =
btrfs), each holding `--size-mb` files of 1 MiB of random data, serves a repository through a
private sshd on 127.0.0.1 (append-only restricted key, as docs/offsite.md recommends), runs
`incus-borg backup` twice and prints, for each run, borg's deduplicated bytes added and the
growth of the repository on the server side, against the data size. Target: the second run
sends < 1% of the data.

Run as root: python bench/offsite.py [--size-mb N] (see bench/README.md)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from benchlib import (
    Column,
    MiB,
    PerPoolBench,
    columns,
    human,
    main,
    positive,
    secs,
    tree_size,
    write_blob,
)
from harness.sshd import PrivateSshd

MAX_SECOND = 0.01  # the second, unchanged run sends < 1% of the data
RUNS = (("first", "first run"), ("second", "second run (unchanged)"))


class OffsiteBench(PerPoolBench):
    """Two runs into a repository served over SSH."""

    name = "offsite.py"
    description = "What a second, unchanged incus-borg run sends to an SSH repository. Needs root."
    options = (("--size-mb", positive(int), 200, "MiB of random files per container"),)
    prefix = "off"

    def fill(self, root: Path) -> None:
        """`--size-mb` files of 1 MiB of random data in /root/data."""
        for i in range(1, self.args.size_mb + 1):
            write_blob(root / "root" / "data" / f"f{i}", MiB, os.urandom)

    def run(self) -> None:
        """Two backups into the SSH repository, measuring its growth on the server side."""
        sshd = PrivateSshd(self.s.out / "sshd")
        sshd.start()
        try:
            url, ssh = sshd.url("offsite"), sshd.ssh_command
            repos = [{"path": url, "label": "offsite", "ssh_command": ssh, "append_only": True}]
            config = self.config("offsite", repos, instances=list(self.names))
            repo = sshd.repos / "offsite"
            for key, what in RUNS:
                before = tree_size(repo)[0]
                m, _, _ = self.backup(key, what, config)
                m.data["growth"] = tree_size(repo)[0] - before
        finally:
            sshd.stop()

    def sections(self) -> list[str]:
        """Headline and the two runs."""
        spec: list[Column] = [
            ("run", lambda m: m.what),
            ("wall s", lambda m: secs(m.seconds)),
            ("borg dedup added", lambda m: human(m.added)),
            ("repo growth", lambda m: human(m.data["growth"])),
            ("% of data", lambda m: f"{100 * m.data['growth'] / self.data:.3f}%"),
        ]
        title = f"offsite benchmark: {human(self.data)} in {len(self.names)} containers"
        return [self.headline(title), columns(spec, [self.measures[key] for key, _ in RUNS])]

    def target_rows(self) -> list[tuple[str, str, bool]]:
        """The second run against the data."""
        second = self.measures["second"].data["growth"] / self.data
        return [("second run sends < 1% of the data", f"{second:.3%}", second < MAX_SECOND)]


if __name__ == "__main__":
    sys.exit(main(OffsiteBench))
