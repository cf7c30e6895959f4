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

Run as root: .venv/bin/python bench/restore.py [--scale N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchlib import (
    BASE_TREES,
    BTRFS_POOL,
    DEFAULT_POOL,
    LARGE_MIB,
    SMALL_FILES,
    GiB,
    IncusServer,
    Measure,
    MiB,
    Runner,
    Scratch,
    borg_env,
    container_dir,
    fill_container,
    human,
    incus_borg_argv,
    log,
    make_config,
    measuring,
    rootfs,
    run_bench,
    table,
    tree_size,
    verdict,
)

MAX_RATIO = 1.3  # restore <= 1.3 x import of the uncompressed export
POOLS = {"dir": DEFAULT_POOL, "btrfs": BTRFS_POOL}


@dataclass
class Attempt:
    """One timed restore or import."""

    name: str
    pool: str
    method: str
    round: int
    seconds: float
    cpu_client: float
    cpu_daemon: float
    extra_peak: int
    restored: int  # bytes of regular files in the new instance's directory
    timeline: str = ""  # restore: when each borg command started (seconds)


class RestoreBench:
    """Runs the measurements against one prepared server."""

    def __init__(self, server: IncusServer, s: Scratch, args: argparse.Namespace) -> None:
        self.server = server
        self.s = s
        self.args = args
        self.runner = Runner(s.logs, borg_env(s))
        self.daemon = server.daemon
        self.incus_dir = Path(self.daemon.incus_dir)
        self.sampled = {"data fs": s.data, "btrfs pool": self.incus_dir / "storage-pools" / "fast"}
        self.instances: dict[str, str] = {}  # name -> pool
        self.sizes: dict[str, tuple[int, int]] = {}
        self.exports: dict[str, Measure] = {}
        self.attempts: list[Attempt] = []
        self.backup: Measure | None = None
        self.run_name = ""
        self.export_tar: dict[str, float] = {}
        self.small_read = 0.0
        self.config = s.out / "unset"

    def measure(self, key: str, what: str) -> Any:
        """Context manager measuring one step (time, CPU, extra disk)."""
        image = self.incus_dir / "disks" / f"{BTRFS_POOL}.img"
        return measuring(Measure(key, what), self.sampled, lambda: self.daemon.pid, [image])

    def build(self) -> None:
        """Launch and fill one container per pool, back them up, export them."""
        for n, kind in enumerate(self.args.pools):
            name, pool = f"r-{kind}", POOLS[kind]
            log(f"launching and filling {name} on {pool}")
            self.server.launch(name, pool=pool)
            fill_container(rootfs(self.server, pool, name), self.args.scale, seed=n)
            self.instances[name] = pool
        os.sync()
        for name, pool in self.instances.items():
            self.sizes[name] = tree_size(container_dir(self.server, pool, name))
        self.config = make_config(self.server, self.s, self.s.out / "repo-incus-borg")
        self.runner.run(incus_borg_argv(self.config, "init"))
        log("incus-borg backup")
        with self.measure("backup", "incus-borg backup") as m:
            done = self.runner.run(incus_borg_argv(self.config, "backup", "--json"), ok=(0, 1))
        self.backup = m
        self.run_name = json.loads(done.stdout)["run"]
        for name in self.instances:
            out = self.s.out / f"{name}.tar"
            log(f"incus export {name} --compression none")
            with self.measure("export", f"incus export {name}") as m:
                self.runner.run(
                    ["incus", "export", name, str(out), "--compression", "none"],
                    env=self.daemon.env,
                )
            m.added = out.stat().st_size
            self.exports[name] = m

    def run(self) -> None:
        """Alternate import and restore of each instance, `--repeat` rounds."""
        for name, pool in self.instances.items():
            for r in range(self.args.repeat):
                methods = ("import", "restore") if r % 2 == 0 else ("restore", "import")
                for method in methods:
                    self.attempt(name, pool, method, r)

    def attempt(self, name: str, pool: str, method: str, r: int) -> None:
        """One timed import or restore into a new instance, deleted afterwards."""
        new = f"{name}-{method[:3]}"
        if method == "import":
            tarball = self.s.out / f"{name}.tar"
            argv = ["incus", "import", str(tarball), new, "--storage", pool]
        else:
            argv = incus_borg_argv(
                self.config, "restore", "instance", self.run_name, name, "--as", new, debug=True
            )
        log(f"round {r + 1}: {method} {name} as {new}")
        with self.measure(method, " ".join(argv)) as m:
            done = self.runner.run(argv, env=self.daemon.env, stamp=method == "restore")
        restored, _ = tree_size(container_dir(self.server, pool, new))
        attempt = Attempt(
            name, pool, method, r + 1, m.seconds, m.cpu_client, m.cpu_daemon, m.extra_peak, restored
        )
        if method == "restore":
            attempt.timeline = timeline(done.stderr)
        self.attempts.append(attempt)
        self.daemon.incus("delete", "--force", new, timeout=600)
        os.sync()

    def pieces(self) -> None:
        """The parts of a restore alone: `borg export-tar` of the instance's archive to
        /dev/null, and one small `borg extract --stdout` (what each metadata read costs)."""
        repo = self.s.out / "repo-incus-borg"
        borg = str(Path(sys.executable).parent / "borg")
        for name in self.instances:
            archive = f"{self.run_name}@instance@default@{name}"
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
            a.seconds for a in self.attempts if a.name == name and a.method == method
        )

    def report(self) -> str:
        """The printed tables."""
        assert self.backup is not None
        lines = [
            f"incus-borg restore benchmark, scale {self.args.scale}, {self.args.repeat} round(s) "
            f"per instance (order alternates); machine: {os.cpu_count()} cores, load before "
            f"start {self.args.load}",
            "instances: "
            + ", ".join(
                f"{n} on {p}: {human(self.sizes[n][0])} in {self.sizes[n][1]} files"
                for n, p in self.instances.items()
            ),
            f"setup (not compared): incus-borg backup {self.backup.seconds:.1f} s; "
            + ", ".join(
                f"export {n} --compression none {m.seconds:.1f} s, {human(m.added)}"
                for n, m in self.exports.items()
            ),
            "",
        ]
        rows = [
            [
                a.name,
                a.pool,
                a.method,
                str(a.round),
                f"{a.seconds:.1f}",
                f"{a.cpu_client:.1f}",
                f"{a.cpu_daemon:.1f}",
                human(a.extra_peak),
                human(a.restored),
            ]
            for a in self.attempts
        ]
        headers = [
            "instance",
            "pool",
            "method",
            "round",
            "wall s",
            "cpu s",
            "incusd cpu s",
            "disk peak",
            "restored",
        ]
        lines += [table(headers, rows, {3, 4, 5, 6, 7, 8}), ""]
        lines.append(
            "disk peak: the most the data filesystems filled up during the step, the new "
            "instance included (unreliable on btrfs, which frees deleted subvolumes later)."
        )
        lines.append("")
        summary = []
        for name, pool in self.instances.items():
            imp, res = self.median(name, "import"), self.median(name, "restore")
            ratio = res / imp
            summary.append(
                [
                    f"{name} ({pool})",
                    f"{imp:.1f}",
                    f"{res:.1f}",
                    f"{ratio:.2f}",
                    f"<= {MAX_RATIO}",
                    verdict(ratio <= MAX_RATIO),
                ]
            )
        sheaders = ["instance", "import s", "incus-borg restore s", "ratio", "target", ""]
        lines.append("median over rounds:")
        lines.append(table(sheaders, summary, {1, 2, 3}))
        lines += ["", "where a restore's time goes (when each borg command started, seconds):"]
        for a in self.attempts:
            if a.method == "restore":
                lines.append(f"  {a.name} round {a.round}: {a.timeline}; done at {a.seconds:.1f}")
        for name in self.instances:
            lines.append(
                f"  {name}: borg export-tar alone to /dev/null {self.export_tar.get(name, 0.0):.1f} s"
                f"; import of the file {self.median(name, 'import'):.1f} s"
            )
        lines.append(
            f"  one `borg extract --stdout` of manifest.json (each metadata read): "
            f"{self.small_read:.2f} s"
        )
        return "\n".join(lines)

    def raw(self) -> dict[str, Any]:
        """Everything measured, for --json."""
        return {
            "args": {k: str(v) for k, v in vars(self.args).items()},
            "sizes": self.sizes,
            "backup": asdict(self.backup) if self.backup else None,
            "exports": {k: asdict(v) for k, v in self.exports.items()},
            "attempts": [asdict(a) for a in self.attempts],
            "export_tar": self.export_tar,
            "small_read": self.small_read,
        }


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


def estimate(args: argparse.Namespace) -> int:
    """Rough bytes of instance data for these arguments."""
    base = sum(tree_size(Path(t))[0] for t in BASE_TREES if Path(t).is_dir())
    per = base + SMALL_FILES * args.scale * 8000 + 2 * LARGE_MIB * MiB * args.scale
    return int(per * len(args.pools))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=(
            "Benchmark `incus-borg restore instance` against `incus import` of the same "
            "instance's uncompressed export, on a private Incus. Needs root."
        ),
        epilog="Containers are filled as in bench/backup.py (about 350 MB each at scale 1).",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the unique small files and large files of the container (default 1)",
    )
    parser.add_argument(
        "--pools",
        default="dir,btrfs",
        help="comma-separated pool kinds to test, of dir and btrfs (default both)",
    )
    parser.add_argument(
        "--repeat", type=int, default=2, help="rounds per instance, alternating order (2)"
    )
    parser.add_argument(
        "--tmp", type=Path, default=Path("/tmp"), help="where the scratch tree goes (/tmp)"
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures to this file")
    args = parser.parse_args(argv)
    args.pools = [p for p in args.pools.split(",") if p]
    if not args.pools or set(args.pools) - set(POOLS):
        parser.error("--pools takes dir and/or btrfs")
    if args.scale <= 0 or args.repeat < 1:
        parser.error("--scale must be > 0 and --repeat >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    data = estimate(args)
    btrfs_size = f"{max(4, math.ceil(4 * data / GiB))}GiB"  # the instance plus a restored copy

    def measure(server: IncusServer, s: Scratch) -> tuple[str, Any]:
        bench = RestoreBench(server, s, args)
        bench.build()
        bench.run()
        bench.pieces()
        return bench.report(), bench.raw()

    return run_bench(
        "restore.py", args, 5 * data + 2 * GiB, 4 * data + 8 * GiB, btrfs_size, measure
    )


if __name__ == "__main__":
    sys.exit(main())
