#!/usr/bin/env python3
"""Benchmark: backing up an Incus server with incus-borg against the alternatives.

Builds a private Incus (tests/harness) on a scratch ext4 loop filesystem, with containers on
the `default` (dir) and `fast` (btrfs) pools, each holding a /usr-like tree of many small
files copied from the host, unique small files and two large files (random and
compressible). Then measures, one after the other:

  a   tar -czf of the Incus directory (the old manual method)
  b   incus export of every instance (default compression)
  c1  plain borg create of the Incus directory into a fresh repository (the floor)
  c2  the same again, nothing changed
  d   incus-borg backup, first run, into another fresh repository
  e   incus-borg backup, second run, nothing changed
  f   incus-borg backup, third run, after changing 1% of the files
  c3  plain borg create after the same change (for comparison with f)
  g   plain borg create of each freeze-mode instance's directory alone (fresh repository,
      then again unchanged), to compare with its freeze window

and prints wall time, bytes added, peak extra disk, quiesce windows and the targets.
Everything is removed afterwards, also on failure or Ctrl-C.

Run as root: .venv/bin/python bench/backup.py [--scale N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
    allocated,
    borg_binary,
    borg_env,
    change_files,
    container_dir,
    fill_container,
    human,
    incus_borg_argv,
    log,
    make_config,
    measuring,
    parse_size,
    rootfs,
    run_bench,
    table,
    tree_size,
    verdict,
)

from incus_borg import layout

# Targets from the issue.
MAX_FIRST_RATIO = 1.15  # d <= 1.15 x c1
MAX_SECOND_RATIO = 1.15  # e <= 1.15 x c2
MAX_SECOND_ADDED = 0.005  # e adds < 0.5% of the data
MAX_EXTRA_DISK = 0.01  # extra disk < 1% of the data
MAX_SNAPSHOT_WINDOW = 1.0  # seconds per instance on btrfs
MAX_FREEZE_RATIO = 1.2  # freeze window <= 1.2 x borg's read of that instance alone
CHANGED_FRACTION = 0.01

# The plain-borg floor reads the Incus directory like incus-borg's server archive does, but
# with the pools' data in place: the btrfs loop image is excluded (its mount is read), and so
# are the transient files incus-borg also leaves out.
FLOOR_EXCLUDES = tuple(
    f"sh:incus/{p}" for p in layout.INCUS_EXCLUDES if p not in ("database", "storage-pools/*/*/*")
)


@dataclass
class Instance:
    """One benchmark container."""

    name: str
    pool: str
    data: int = 0  # bytes of regular files in its directory
    files: int = 0
    windows: dict[str, float] = field(default_factory=dict)  # step -> quiesce window
    modes: dict[str, str] = field(default_factory=dict)
    alone_first: float | None = None  # plain borg create of its directory, fresh repo
    alone_second: float | None = None  # the same again, unchanged


def phases(stamped: str, total: float) -> str:
    """Where an `incus-borg --debug backup` run spent its time, from its timestamped stderr."""
    marks: list[tuple[float, str]] = []
    for line in stamped.splitlines():
        stamp, _, text = line.strip().partition(" ")
        try:
            at = float(stamp)
        except ValueError:
            continue
        if text.startswith("database: copied"):
            marks.append((at, "db"))
        elif text.startswith("incus-borg: running") and " create " in text:
            found = re.search(r"::\S*@instance@\S+@(\S+)", text)
            marks.append((at, f"create {found.group(1)}" if found else "create server"))
        elif re.match(r"(instance|volume) \S+: ", text):
            marks.append((at, "done " + text.split()[1].split("/")[-1].rstrip(":")))
        elif text.startswith("server: read"):
            marks.append((at, "done server"))
    parts, prev = [], 0.0
    for at, what in marks:
        if what == "db":
            parts.append(f"start to database copied {at:.1f}")
        elif what.startswith("create"):
            parts.append(f"{what.split()[1]}: hold {at - prev:.1f}")
        else:
            parts[-1] += f" + borg/release {at - prev:.1f}"
        prev = at
    parts.append(f"finish {total - prev:.1f}")
    return "; ".join(parts) + " (s)"


class BackupBench:
    """Runs the measurements against one prepared server."""

    def __init__(self, server: IncusServer, s: Scratch, args: argparse.Namespace) -> None:
        self.server = server
        self.s = s
        self.args = args
        self.runner = Runner(s.logs, borg_env(s))
        self.daemon = server.daemon
        self.incus_dir = Path(self.daemon.incus_dir)
        self.sampled = {"data fs": s.data, "btrfs pool": self.incus_dir / "storage-pools" / "fast"}
        self.instances: list[Instance] = []
        self.measures: dict[str, Measure] = {}
        self.data = self.files = 0
        self.changed = (0, 0)
        self.db = (0, 0)
        self.fixed: dict[str, float] = {}

    # -- setup --

    def build(self) -> None:
        """Launch and fill the containers."""
        for pool, kind in ((DEFAULT_POOL, "dir"), (BTRFS_POOL, "btrfs")):
            for i in range(1, self.args.per_pool + 1):
                self.instances.append(Instance(f"b-{kind}-{i}", pool))
        for n, inst in enumerate(self.instances):
            log(f"launching and filling {inst.name} on {inst.pool}")
            self.server.launch(inst.name, pool=inst.pool)
            fill_container(rootfs(self.server, inst.pool, inst.name), self.args.scale, seed=n)
        os.sync()
        for inst in self.instances:
            inst.data, inst.files = tree_size(container_dir(self.server, inst.pool, inst.name))
        self.data = sum(i.data for i in self.instances)
        database = self.incus_dir / "database"
        self.db = tree_size(database)[0], allocated(database)
        self.files = sum(i.files for i in self.instances)
        log(f"instance data: {human(self.data)} in {self.files} files")

    # -- helpers --

    def step(self, key: str, what: str) -> Any:
        """Context manager measuring step `key`."""
        log(f"{key}: {what}")
        m = Measure(key, what)
        self.measures[key] = m
        image = self.incus_dir / "disks" / f"{BTRFS_POOL}.img"
        return measuring(m, self.sampled, lambda: self.daemon.pid, [image])

    def borg(self, *args: str, ok: tuple[int, ...] = (0, 1)) -> Any:
        """Run the venv's borg with cwd = the daemon's root; returns the finished command."""
        return self.runner.run([borg_binary(), *args], cwd=self.daemon.root, ok=ok)

    def borg_init(self, repo: Path) -> None:
        """A fresh repository, encrypted like incus-borg's (repokey-blake2)."""
        self.borg("init", "--encryption", "repokey-blake2", str(repo), ok=(0,))

    def borg_create(self, key: str, what: str, repo: Path, archive: str) -> None:
        """Plain `borg create` of the Incus directory (minus the loop image and transients)."""
        excludes = [a for p in FLOOR_EXCLUDES for a in ("--exclude", p)]
        with self.step(key, what) as m:
            done = self.borg(
                "create", "--json", "--numeric-ids", *excludes, f"{repo}::{archive}", "incus"
            )
        stats = json.loads(done.stdout)["archive"]["stats"]
        m.added = stats["deduplicated_size"]
        m.data["stats"] = stats
        m.notes.append(f"read {human(stats['original_size'])}, {stats['nfiles']} files")
        if done.returncode:
            m.notes.append(f"borg exit {done.returncode} (warnings)")

    def incus_borg_backup(self, key: str, what: str, config: Path) -> None:
        """One `incus-borg backup --json` run."""
        database = self.incus_dir / "database"
        db_before = allocated(database)
        with self.step(key, what) as m:
            done = self.runner.run(
                incus_borg_argv(config, "backup", "--json", debug=True), ok=(0, 1), stamp=True
            )
        summary = json.loads(done.stdout)
        m.data["timeline"] = done.stderr
        m.added = sum(summary["deduplicated_bytes_added"].values())
        m.data["summary"] = summary
        by_name = {i.name: i for i in self.instances}
        for item in summary["items"]:
            name = item["ref"].split("/")[-1]
            if item["kind"] == "instance" and name in by_name:
                by_name[name].windows[key] = float(item["window"])
                by_name[name].modes[key] = item["mode"]
        read = sum(i["bytes_read"] for i in summary["items"])
        changed = sum(summary["changed_files"].values())
        m.notes.append(
            f"instances read {human(read)}, {changed} file(s) not in files cache, "
            f"daemon down {summary['daemon_downtime']:.2f} s"
        )
        m.notes.append("phases: " + phases(done.stderr, done.seconds))
        m.notes.append(
            f"incus database directory {human(db_before)} before, "
            f"{human(allocated(database))} after (allocated)"
        )
        if summary["warnings"]:
            m.notes.append("warnings: " + "; ".join(summary["warnings"]))

    # -- the steps --

    def run(self) -> None:
        """All measurements, in order."""
        self.tar()
        self.export()
        floor = self.s.out / "repo-floor"
        self.borg_init(floor)
        self.borg_create("c1", "borg create of the Incus dir (1st)", floor, "c1")
        self.borg_create("c2", "borg create of the Incus dir (2nd, unchanged)", floor, "c2")
        config = make_config(self.server, self.s, self.s.out / "repo-incus-borg")
        self.runner.run(incus_borg_argv(config, "init"))
        self.incus_borg_backup("d", "incus-borg backup (1st)", config)
        self.incus_borg_backup("e", "incus-borg backup (2nd, unchanged)", config)
        roots = [rootfs(self.server, i.pool, i.name) for i in self.instances]
        self.changed = change_files(roots, CHANGED_FRACTION, seed=42)
        os.sync()
        log(f"changed {self.changed[0]} of {self.changed[1]} non-empty files")
        self.incus_borg_backup(
            "f", f"incus-borg backup (3rd, {self.changed[0]} files changed)", config
        )
        self.borg_create("c3", "borg create of the Incus dir (after the change)", floor, "c3")
        self.fixed_cost(floor)
        shutil.rmtree(floor)
        self.alone()

    def fixed_cost(self, repo: Path) -> None:
        """(h) What borg costs with nothing to do: --version, info, create of an empty
        directory; the median of 3 each."""
        empty = self.s.out / "empty"
        empty.mkdir()
        calls: dict[str, Callable[[int], list[str]]] = {
            "borg --version": lambda n: ["--version"],
            "borg info REPO": lambda n: ["info", str(repo)],
            "borg create (empty dir)": lambda n: ["create", f"{repo}::empty{n}", str(empty)],
        }
        for what, argv in calls.items():
            times = sorted(self.borg(*argv(n)).seconds for n in range(3))
            self.fixed[what] = times[1]
        log("h: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.fixed.items()))
        empty.rmdir()

    def tar(self) -> None:
        """(a) tar -czf of the whole Incus directory, as a naive cron job would."""
        out = self.s.out / "incus.tar.gz"
        with self.step("a", "tar -czf of the Incus dir") as m:
            done = self.runner.run(
                ["tar", "--totals", "-czf", str(out), "-C", str(self.daemon.root), "incus"],
                ok=(0, 1, 2),
            )
        m.added = out.stat().st_size
        found = re.search(r"Total bytes written: (\d+)", done.stderr)
        tar_bytes = int(found.group(1)) if found else None
        image = self.incus_dir / "disks" / f"{BTRFS_POOL}.img"
        st = image.stat()
        pool_bytes, _ = tree_size(self.incus_dir / "storage-pools" / BTRFS_POOL)
        m.data.update(
            tar_stream=tar_bytes,
            image_apparent=st.st_size,
            image_allocated=st.st_blocks * 512,
            btrfs_pool_content=pool_bytes,
            returncode=done.returncode,
        )
        m.notes.append(
            f"tar stream {human(tar_bytes)}: includes the btrfs loop image whole "
            f"({human(st.st_size)} apparent, {human(st.st_blocks * 512)} allocated) "
            f"and its {human(pool_bytes)} of files again through the mount"
        )
        if done.returncode:
            said = [ln for ln in done.stderr.splitlines() if not ln.startswith("Total bytes")]
            m.notes.append(f"tar exit {done.returncode}: " + " | ".join(said)[:200])
        out.unlink()

    def export(self) -> None:
        """(b) incus export of every instance, default compression, one after the other."""
        outs = []
        with self.step("b", f"incus export x{len(self.instances)} (default compression)") as m:
            for inst in self.instances:
                out = self.s.out / f"{inst.name}.tar.gz"
                done = self.runner.run(
                    ["incus", "export", inst.name, str(out)], env=self.daemon.env
                )
                m.data[inst.name] = {"seconds": done.seconds, "bytes": out.stat().st_size}
                outs.append(out)
        m.added = sum(o.stat().st_size for o in outs)
        slowest = max(self.instances, key=lambda i: m.data[i.name]["seconds"])
        m.notes.append(
            f"slowest {slowest.name} {m.data[slowest.name]['seconds']:.1f} s; "
            "tarball written under backups/ first"
        )
        for o in outs:
            o.unlink()

    def alone(self) -> None:
        """(g) borg create of each freeze-mode instance's directory alone, twice."""
        for inst in self.instances:
            if inst.modes.get("d") != "freeze":
                continue
            repo = self.s.out / f"repo-alone-{inst.name}"
            self.borg_init(repo)
            path = str(container_dir(self.server, inst.pool, inst.name))
            for attr, archive in (("alone_first", "first"), ("alone_second", "second")):
                done = self.borg("create", "--numeric-ids", f"{repo}::{archive}", path)
                setattr(inst, attr, done.seconds)
            log(
                f"g: borg alone on {inst.name}: {inst.alone_first:.2f} s, "
                f"again {inst.alone_second:.2f} s"
            )
            shutil.rmtree(repo)

    # -- the report --

    def report(self) -> str:
        """The printed tables."""
        m = self.measures
        pct = 100 / self.data
        head = [
            f"incus-borg backup benchmark, scale {self.args.scale}: {len(self.instances)} "
            f"containers ({self.args.per_pool} on dir pool `default`, {self.args.per_pool} on "
            f"btrfs pool `fast`, {self.args.btrfs_size} loop image)",
            f"instance data {human(self.data)} in {self.files} files "
            f"({', '.join(f'{i.name} {human(i.data)}' for i in self.instances)}); "
            f"machine: {os.cpu_count()} cores, load before start {self.args.load}",
            "",
        ]
        rows = []
        for key in ("a", "b", "c1", "c2", "d", "e", "f", "c3"):
            x = m[key]
            rows.append(
                [
                    key,
                    x.what,
                    f"{x.seconds:.1f}",
                    human(x.added),
                    f"{x.added * pct:.2f}%" if x.added is not None else "-",
                    human(x.extra_peak),
                    f"{x.extra_peak * pct:.2f}%",
                    f"{x.cpu_client:.1f}",
                    f"{x.cpu_daemon:.1f}",
                ]
            )
        headers = [
            "step",
            "what",
            "wall s",
            "added",
            "added %",
            "extra disk",
            "extra %",
            "cpu s",
            "incusd cpu s",
        ]
        out = [*head, table(headers, rows, {2, 3, 4, 5, 6, 7, 8}), "", "notes:"]
        for key in ("a", "b", "c1", "c2", "d", "e", "f", "c3"):
            x = m[key]
            for note in x.notes:
                out.append(f"  {key}: {note}")
            by_fs = ", ".join(f"{k} {human(v)}" for k, v in x.extra_by_fs.items())
            out.append(f"  {key}: extra disk, peaks: {by_fs}; net at end {human(x.extra_end)}")
        out.append(
            "  h: borg's fixed costs (median of 3): "
            + ", ".join(f"{k} {v:.2f} s" for k, v in self.fixed.items())
        )
        out.append(
            f"  incus database directory at the start: {human(self.db[1])} allocated, mostly "
            "dqlite's preallocated 8 MiB open segments (a stopped daemon closes and trims them, "
            "so what incus-borg copies is much smaller)"
        )
        out += ["", "quiesce windows per instance (s):"]
        wrows = []
        for i in self.instances:
            ratio = (
                f"{i.windows['d'] / i.alone_first:.2f}"
                if i.alone_first and "d" in i.windows
                else "-"
            )
            ratio2 = (
                f"{i.windows['e'] / i.alone_second:.2f}"
                if i.alone_second and "e" in i.windows
                else "-"
            )
            wrows.append(
                [
                    i.name,
                    i.pool,
                    i.modes.get("d", "-"),
                    human(i.data),
                    *(f"{i.windows[k]:.2f}" if k in i.windows else "-" for k in ("d", "e", "f")),
                    f"{i.alone_first:.2f}" if i.alone_first else "-",
                    ratio,
                    f"{i.alone_second:.2f}" if i.alone_second else "-",
                    ratio2,
                ]
            )
        wheaders = [
            "instance",
            "pool",
            "mode",
            "data",
            "d",
            "e",
            "f",
            "borg alone",
            "d/alone",
            "alone again",
            "e/again",
        ]
        out.append(table(wheaders, wrows, {3, 4, 5, 6, 7, 8, 9, 10}))
        out += ["", "targets:", self.targets()]
        return "\n".join(out)

    def targets(self) -> str:
        """The issue's targets next to the figures."""
        m = self.measures
        rows: list[list[str]] = []

        def add(target: str, figure: str, ok: bool) -> None:
            rows.append([target, figure, verdict(ok)])

        r1 = m["d"].seconds / m["c1"].seconds
        add(f"d <= {MAX_FIRST_RATIO} x c1", f"d/c1 = {r1:.2f}", r1 <= MAX_FIRST_RATIO)
        r2 = m["e"].seconds / m["c2"].seconds
        add(f"e <= {MAX_SECOND_RATIO} x c2", f"e/c2 = {r2:.2f}", r2 <= MAX_SECOND_RATIO)
        e_added = (m["e"].added or 0) / self.data
        add(
            f"e adds < {MAX_SECOND_ADDED:.1%} of the data",
            f"{human(m['e'].added)} = {e_added:.3%}",
            e_added < MAX_SECOND_ADDED,
        )
        for key in ("d", "e", "f"):
            extra = m[key].extra_peak / self.data
            add(
                f"{key}: extra disk < {MAX_EXTRA_DISK:.0%} of the data",
                f"{human(m[key].extra_peak)} = {extra:.3%}",
                extra < MAX_EXTRA_DISK,
            )
        for i in self.instances:
            for key in ("d", "e", "f"):
                if i.modes.get(key) == "snapshot":
                    w = i.windows[key]
                    add(
                        f"{key}: snapshot window {i.name} < {MAX_SNAPSHOT_WINDOW:.0f} s",
                        f"{w:.2f} s",
                        w < MAX_SNAPSHOT_WINDOW,
                    )
        for i in self.instances:
            if i.modes.get("d") == "freeze" and i.alone_first:
                ratio = i.windows["d"] / i.alone_first
                add(
                    f"d: freeze window {i.name} <= {MAX_FREEZE_RATIO} x borg alone",
                    f"{i.windows['d']:.2f} / {i.alone_first:.2f} s = {ratio:.2f}",
                    ratio <= MAX_FREEZE_RATIO,
                )
        return table(["target", "figure", ""], rows, set())

    def raw(self) -> dict[str, Any]:
        """Everything measured, for --json."""
        return {
            "args": {k: v for k, v in vars(self.args).items() if k != "json"},
            "data": self.data,
            "files": self.files,
            "changed": self.changed,
            "instances": [asdict(i) for i in self.instances],
            "measures": {k: asdict(v) for k, v in self.measures.items()},
        }


def estimate(args: argparse.Namespace) -> int:
    """Rough bytes of instance data for these arguments."""
    base = 0
    for tree in BASE_TREES:
        if Path(tree).is_dir():
            base += tree_size(Path(tree))[0]
    per = base + SMALL_FILES * args.scale * 8000 + 2 * LARGE_MIB * MiB * args.scale
    return int(per * 2 * args.per_pool)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=(
            "Benchmark incus-borg backup against tar, incus export and plain borg on a "
            "private Incus with containers on a dir and a btrfs pool. Needs root."
        ),
        epilog=(
            f"At scale 1 each container holds {', '.join(BASE_TREES)} (copied from the host), "
            f"{SMALL_FILES} unique small files and two {LARGE_MIB} MiB files (random, and "
            "4:1 compressible): about 1.5 GB in 44,000 files with 2 containers per pool."
        ),
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the unique small files and large files per container (default 1)",
    )
    parser.add_argument(
        "--per-pool", type=int, default=2, help="containers on each pool (default 2)"
    )
    parser.add_argument(
        "--btrfs-size",
        default=None,
        help="size of the btrfs loop pool (default 6GiB, more for large scales)",
    )
    parser.add_argument(
        "--tmp", type=Path, default=Path("/tmp"), help="where the scratch tree goes (/tmp)"
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures to this file")
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.per_pool < 1:
        parser.error("--scale must be > 0 and --per-pool >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    data = estimate(args)
    if args.btrfs_size is None:
        args.btrfs_size = f"{max(6, math.ceil(3 * (data / 2) / GiB))}GiB"
    data_fs = 3 * data + parse_size(args.btrfs_size) + 4 * GiB  # sparse: only used space counts

    def measure(server: IncusServer, s: Scratch) -> tuple[str, Any]:
        bench = BackupBench(server, s, args)
        bench.build()
        bench.run()
        return bench.report(), bench.raw()

    return run_bench(
        "backup.py", args, int(4.5 * data) + 2 * GiB, data_fs, args.btrfs_size, measure
    )


if __name__ == "__main__":
    sys.exit(main())
