#!/usr/bin/env python3
"""Benchmark: restoring one instance with incus-borg against `incus import` of an export.

Builds a private Incus (tests/harness) on a scratch ext4 loop filesystem with one container
per pool (`default` = dir, `fast` = btrfs), filled like bench/backup.py does, backs it up
once with incus-borg and exports each container uncompressed
(`incus export NAME FILE --compression none`). Then, per container and round (the order
alternates between rounds), it times

  import    incus import FILE NEW --storage POOL
  restore   incus-borg restore instance RUN NAME --as NEW

deleting the new instance after each, and prints both times and their ratio against the
target (restore <= 1.3 x import). Everything is removed afterwards, also on failure or
Ctrl-C.

Run as root: python bench/restore.py [--scale N] (see bench/README.md)
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchlib import (
    POOLS,
    SCALE,
    Bench,
    Column,
    GiB,
    Measure,
    Sizes,
    columns,
    container_dir,
    container_estimate,
    fill_container,
    human,
    log,
    main,
    pool_kinds,
    positive,
    secs,
    tree_size,
)

from incus_borg import layout
from incus_borg.borg import find_borg

MAX_RATIO = 1.3  # restore <= 1.3 x import of the uncompressed export


def timeline(stamped: str) -> str:
    """From `incus-borg --debug restore`'s timestamped stderr: when each borg command started
    and ended, as `0.31 extract, 0.92 list, ... 5.1 extract #3 ended`."""
    events = []
    for line in stamped.splitlines():
        stamp, _, text = line.strip().partition(" ")
        words = text.split()
        if text.startswith("incus-borg: running") and len(words) > 2 and "borg" in words[2]:
            command = next((w for w in words[3:] if not w.startswith("-")), "?")
            events.append(f"{float(stamp):.2f} {command}")
        elif text.startswith("incus-borg: borg ") and " took " in text:
            events.append(f"{float(stamp):.2f} {words[2]} {words[3]} ended")
    return ", ".join(events)


class RestoreBench(Bench):
    """Runs the measurements against one prepared server."""

    name = "restore.py"
    description = (
        "Benchmark `incus-borg restore instance` against `incus import` of the same "
        "instance's uncompressed export, on a private Incus. Needs root."
    )
    epilog = "Containers are filled as in bench/backup.py (about 350 MB each at scale 1)."
    options = (
        SCALE,
        ("--pools", pool_kinds, "dir,btrfs", "pool kinds, comma-separated"),
        ("--repeat", positive(int), 2, "rounds per instance, the order alternating"),
    )

    @classmethod
    def sizes(cls, args: Any) -> Sizes:
        data = int(container_estimate(args.scale) * len(args.pools))
        btrfs = f"{max(4, math.ceil(4 * data / GiB))}GiB"  # the instance plus a restored copy
        return Sizes(5 * data + 2 * GiB, 4 * data + 8 * GiB, btrfs)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.instances = {f"r-{kind}": POOLS[kind] for kind in self.args.pools}
        self.sizes_of: dict[str, tuple[int, int]] = {}
        self.attempts: list[Measure] = []
        self.run_name = ""
        self.export_tar: dict[str, float] = {}
        self.small_read = 0.0
        self.config_file = Path()

    def build(self) -> None:
        """Launch and fill one container per pool, back them up, export them."""
        scale = self.args.scale
        self.launch(self.instances, lambda n, root: fill_container(root, scale, n))
        for name, pool in self.instances.items():
            self.sizes_of[name] = tree_size(container_dir(self.server, pool, name))
        self.config_file = self.config("incus-borg")
        _, summary, _ = self.backup("backup", "incus-borg backup", self.config_file)
        self.run_name = summary["run"]
        for name in self.instances:
            out = self.s.out / f"{name}.tar"
            with self.step(f"export {name}", f"incus export {name} --compression none") as m:
                argv = ["incus", "export", name, str(out), "--compression", "none"]
                self.runner.run(argv, env=self.daemon.env)
            m.added = out.stat().st_size

    def run(self) -> None:
        """Alternate import and restore of each instance, `--repeat` rounds; then the pieces
        of a restore alone."""
        for name, pool in self.instances.items():
            for r in range(1, self.args.repeat + 1):
                methods = ("import", "restore") if r % 2 else ("restore", "import")
                for method in methods:
                    self.attempt(name, pool, method, r)
        self.pieces()

    def attempt(self, name: str, pool: str, method: str, r: int) -> None:
        """One timed import or restore into a new instance, deleted afterwards."""
        new, key = f"{name}-{method[:3]}", f"{method} {name} {r}"
        if method == "import":
            argv = ["incus", "import", str(self.s.out / f"{name}.tar"), new, "--storage", pool]
            with self.step(key, " ".join(argv)) as m:
                self.runner.run(argv, env=self.daemon.env)
        else:
            m, done = self.restore(key, self.config_file, self.run_name, name, new)
            m.data["timeline"] = timeline(done.stderr)
        restored, _ = tree_size(container_dir(self.server, pool, new))
        m.data.update(name=name, pool=pool, method=method, round=r, restored=restored)
        self.attempts.append(m)
        self.delete(new)

    def pieces(self) -> None:
        """The parts of a restore alone: `borg export-tar` of the instance's archive to
        /dev/null, and one small `borg extract --stdout` (what each metadata read costs)."""
        repo = self.s.out / "repo-incus-borg"
        borg = find_borg()
        for name in self.instances:
            archive = layout.instance_archive(self.run_name, "default", name)
            argv = [borg, "export-tar", "--strip-components", "3"]
            argv += [f"{repo}::{archive}", "-", f"instances/default/{name}"]
            times = [self.runner.run(argv, discard=True).seconds for _ in range(2)]
            self.export_tar[name] = statistics.median(times)
            log(f"borg export-tar of {name} to /dev/null: {self.export_tar[name]:.1f} s")
        argv = [borg, "extract", "--stdout", f"{repo}::{self.run_name}", "manifest.json"]
        self.small_read = statistics.median(self.runner.run(argv).seconds for _ in range(3))

    def median(self, name: str, method: str) -> float:
        """Median wall time of `method` for instance `name`."""
        return statistics.median(
            m.seconds
            for m in self.attempts
            if m.data["name"] == name and m.data["method"] == method
        )

    # -- the report --

    def sections(self) -> list[str]:
        """Headline, attempts, medians, where the time goes."""
        a, ms = self.args, self.measures
        sizes = (
            f"{n} on {p}: {human(self.sizes_of[n][0])} in {self.sizes_of[n][1]} files"
            for n, p in self.instances.items()
        )
        exports = (
            f"export {n} --compression none {m.seconds:.1f} s, {human(m.added)}"
            for n, m in ((n, ms[f"export {n}"]) for n in self.instances)
        )
        title = (
            f"incus-borg restore benchmark, scale {a.scale}, {a.repeat} round(s) per instance "
            "(order alternates)"
        )
        backup = f"setup (not compared): incus-borg backup {ms['backup'].seconds:.1f} s; "
        return [
            self.headline(title, "instances: " + ", ".join(sizes), backup + ", ".join(exports)),
            self.attempt_table() + "\n\ndisk peak: the most the data filesystems filled up "
            "during the step, the new instance included (unreliable on btrfs, which frees "
            "deleted subvolumes later).",
            "median over rounds:\n" + self.median_table(),
            "where a restore's time goes (when each borg command started, seconds):\n"
            + "\n".join(self.pieces_lines()),
        ]

    def attempt_table(self) -> str:
        """Every timed import and restore."""
        spec: list[Column] = [
            ("instance", lambda m: m.data["name"]),
            *((k, lambda m, k=k: m.data[k]) for k in ("pool", "method", "round")),
            ("wall s", lambda m: secs(m.seconds)),
            ("cpu s", lambda m: secs(m.cpu_client)),
            ("incusd cpu s", lambda m: secs(m.cpu_daemon)),
            ("disk peak", lambda m: human(m.extra_peak)),
            ("restored", lambda m: human(m.data["restored"])),
        ]
        return columns(spec, self.attempts)

    def ratio(self, name: str) -> float:
        """Median restore against median import of `name`."""
        return self.median(name, "restore") / self.median(name, "import")

    def median_table(self) -> str:
        """Per instance: the medians of both methods and their ratio."""
        spec: list[Column] = [
            ("instance", lambda n: f"{n} ({self.instances[n]})"),
            ("import s", lambda n: secs(self.median(n, "import"))),
            ("incus-borg restore s", lambda n: secs(self.median(n, "restore"))),
            ("ratio", lambda n: f"{self.ratio(n):.2f}"),
        ]
        return columns(spec, self.instances)

    def target_rows(self) -> Iterator[tuple[str, str, bool]]:
        """Each instance's median restore against its median import."""
        for name in self.instances:
            r = self.ratio(name)
            yield f"restore {name} <= {MAX_RATIO} x import", f"{r:.2f}", r <= MAX_RATIO

    def pieces_lines(self) -> Iterator[str]:
        """Each restore's borg timeline, and the pieces of a restore timed alone."""
        for m in self.attempts:
            if m.data["method"] == "restore":
                d = m.data
                yield f"  {d['name']} round {d['round']}: {d['timeline']}; done at {m.seconds:.1f}"
        for name in self.instances:
            yield (
                f"  {name}: borg export-tar alone to /dev/null {self.export_tar[name]:.1f} s"
                f"; import of the file {self.median(name, 'import'):.1f} s"
            )
        yield (
            "  one `borg extract --stdout` of manifest.json (each metadata read): "
            f"{self.small_read:.2f} s"
        )

    def raw(self) -> dict[str, Any]:
        """Everything measured, for --json."""
        return {
            **super().raw(),
            "sizes": self.sizes_of,
            "export_tar": self.export_tar,
            "small_read": self.small_read,
        }


if __name__ == "__main__":
    sys.exit(main(RestoreBench))
