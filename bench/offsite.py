"""Offsite benchmark: what a second, unchanged run sends to an SSH repository.

Builds a private Incus with containers holding data, serves a repository through a private
sshd on 127.0.0.1 (append-only restricted key, as the README recommends), runs
`incus-borg backup` twice and prints, for each run, borg's deduplicated bytes added and the
growth of the repository on the server side, against the data size. Target: the second run
sends < 1% of the data.

Run as root: `.venv/bin/python bench/offsite.py [--size-mb N]`. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cli import incus_config  # noqa: E402
from harness.incusd import PrivateIncus  # noqa: E402
from harness.server import prepare_server  # noqa: E402
from harness.sshd import PrivateSshd  # noqa: E402


def tree_size(path: Path) -> int:
    """Bytes in the regular files below `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def backup(config: Path) -> tuple[dict[str, object], float]:
    """One `incus-borg backup --json` run: its summary and wall time."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "incus_borg", "-c", str(config), "backup", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout), time.monotonic() - started


def main() -> int:
    """Build, back up twice, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200, help="data per container (MB)")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="incus-borg-bench-offsite-") as tmp,
        PrivateIncus() as daemon,
    ):
        root = Path(tmp)
        server = prepare_server(daemon, btrfs_size="2GiB")
        names = ["off-dir", "off-btrfs"]
        for name, pool in zip(names, ("default", "fast"), strict=True):
            server.launch(name, pool=pool)
            server.exec(
                name, "sh", "-c",
                f"mkdir -p /root/data && for i in $(seq {args.size_mb}); do "
                "head -c 1048576 /dev/urandom > /root/data/f$i; done",
            )  # fmt: skip
        sshd = PrivateSshd(root / "sshd")
        sshd.start()
        try:
            repositories = [
                {"path": sshd.url("offsite"), "label": "offsite", "ssh_command": sshd.ssh_command,
                 "append_only": True},
            ]  # fmt: skip
            config = incus_config(server, root / "conf", repositories=repositories, instances=names)
            env = {k: v for k, v in os.environ.items() if not k.startswith("BORG_")}
            subprocess.run([sys.executable, "-m", "incus_borg", "-c", str(config), "init"],
                           env=env, check=True, capture_output=True)  # fmt: skip
            data = args.size_mb * len(names) * 1_048_576
            repo = sshd.repos / "offsite"
            rows = []
            for label in ("first run", "second run (unchanged)"):
                before = tree_size(repo)
                summary, took = backup(config)
                added = summary["deduplicated_bytes_added"]["offsite"]  # type: ignore[index]
                rows.append((label, took, added, tree_size(repo) - before))
        finally:
            sshd.stop()
    print(f"data: {data / 1e6:.0f} MB in {len(names)} containers (dir and btrfs)")
    print(f"{'run':26} {'wall s':>7} {'borg dedup added':>17} {'repo growth':>12} {'% of data':>9}")
    for label, took, added, growth in rows:
        print(
            f"{label:26} {took:7.1f} {added / 1e6:14.2f} MB {growth / 1e6:9.2f} MB {100 * growth / data:8.3f}%"
        )
    second = rows[-1][3] / data
    print(
        f"target: second run sends < 1% of the data -> {100 * second:.3f}% {'met' if second < 0.01 else 'MISSED'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
