"""A snapshot group's freeze: N btrfs containers frozen, snapshotted and thawed together,
through the kernel's freezer (what `backup` does) against Incus's own freeze (liblxc, the
baseline), in one private Incus; then the window `incus-borg backup` records for the group.

    python bench/groups.py [--members 10] [--rounds 8]

Every container appends the host's uptime to a file every 10 ms, as a busy service would
write; that is when liblxc's cgroup v1 freeze sleeps (see incus_borg/host/freezer.py).
Not part of the test suite; everything it makes is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from cli import borg, incus_config, run_cli  # noqa: E402
from harness.incusd import PrivateIncus  # noqa: E402
from harness.server import BTRFS_POOL, prepare_server  # noqa: E402

from incus_borg.backup.journal import Journal, Step  # noqa: E402
from incus_borg.backup.quiesce import Quiescer  # noqa: E402
from incus_borg.config import IncusSettings  # noqa: E402
from incus_borg.host.parallel import side_by_side  # noqa: E402
from incus_borg.incus import Incus  # noqa: E402

CLOCK = (
    "while :; do read u i < /proc/uptime; echo $u >> /root/clock; usleep 10000; done "
    "</dev/null >/dev/null 2>&1 &"
)


def group_round(
    api: Incus, quiescer: Quiescer, names: list[str], freeze: Callable[..., Step], snap: str
) -> float:
    """Freeze every member, snapshot every one, thaw every one (each side by side); seconds
    from the first freeze to the last thaw."""
    began = time.monotonic()
    frozen = side_by_side(lambda n: freeze("default", n), names)
    side_by_side(lambda n: api.create_instance_snapshot("default", n, snap), names)
    side_by_side(quiescer.release, [f for f in frozen if isinstance(f, dict)])
    return time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    daemon = PrivateIncus()
    daemon.start()
    try:
        server = prepare_server(daemon, btrfs_size="2GiB")
        names = [f"g{i}" for i in range(args.members)]
        for name in names:
            server.launch(name, pool=BTRFS_POOL)
            daemon.incus("config", "set", name, "user.incus-borg.group=bench")
            server.exec(name, "setsid", "sh", "-c", CLOCK)
        api = Incus(daemon.incus_dir)
        staging = Path(tempfile.mkdtemp(dir=daemon.root)) / "staging"
        staging.mkdir()
        journal = Journal(staging)
        journal.begin("backup", "bench")
        quiescer = Quiescer(api, IncusSettings(), journal)
        ways = {
            "kernel freezer": quiescer.freeze_briefly,
            "Incus's freeze (liblxc)": quiescer.freeze,
        }
        times: dict[str, list[float]] = {way: [] for way in ways}
        for k in range(args.rounds):
            for way, freeze in ways.items():
                times[way].append(
                    group_round(api, quiescer, names, freeze, f"b{k}{len(times[way])}")
                )
        root = daemon.root / "bench-run"
        config = incus_config(server, root, instances=names)
        assert run_cli("init", config=config).returncode == 0
        windows = []
        for _ in range(3):
            done = run_cli("backup", config=config)
            assert done.returncode == 0, done.stderr
            listed = json.loads(borg("list", "--json", str(root / "repo")).stdout)["archives"]
            manifest = borg(
                "extract", "--stdout", f"{root / 'repo'}::{listed[-1]['name']}", "manifest.json"
            )
            (group,) = json.loads(manifest.stdout)["groups"]
            windows.append(group["window"])
    finally:
        daemon.shutdown()
    print(f"{args.members} btrfs members, {args.rounds} rounds: freeze, snapshot and thaw together")
    print(f"{'freeze through':28} {'median':>8} {'max':>8}")
    for way, seconds in times.items():
        print(f"{way:28} {statistics.median(seconds):7.3f}s {max(seconds):7.3f}s")
    kernel, incus = (statistics.median(times[w]) for w in ways)
    print(f"ratio kernel / Incus (median): {kernel / incus:.2f}")
    print(
        f"`incus-borg backup` group window: {', '.join(f'{w:.3f} s' for w in windows)} (target < 0.5 s)"
    )


if __name__ == "__main__":
    main()
