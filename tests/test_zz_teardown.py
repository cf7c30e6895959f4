"""Teardown of a private daemon leaves nothing behind, however the daemon ended up.

Named ``zz`` so that it runs last; it uses its own daemon, not the session's.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from harness.incusd import PrivateIncus, cmdline, interface_exists, wait_for
from harness.server import BTRFS_POOL, prepare_server

pytestmark = pytest.mark.incus


def _kill_daemon(daemon: PrivateIncus) -> None:
    pid = daemon.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not daemon.running(), 10)


def _break_daemon(daemon: PrivateIncus) -> None:
    """Kill the daemon and hide its database: teardown cannot revive it, only kill and clean."""
    _kill_daemon(daemon)
    (daemon.incus_dir / "database").rename(daemon.incus_dir / "database.broken")


def _move_dir_aside(daemon: PrivateIncus) -> None:
    """What `restore server` does: stop the daemon, rename INCUS_DIR to a sibling."""
    daemon.stop_daemon()
    daemon.incus_dir.rename(daemon.incus_dir.with_name("incus.incus-borg-old-test"))


SCENARIOS: dict[str, Callable[[PrivateIncus], None]] = {
    "daemon-running": lambda daemon: None,
    "daemon-stopped": PrivateIncus.stop_daemon,
    "daemon-killed": _kill_daemon,
    "daemon-unrecoverable": _break_daemon,
    "incus-dir-moved-aside": _move_dir_aside,
}


def _incusd_pids_for(root: Path) -> list[int]:
    """Live incusd processes whose command line names ``root``."""
    pids = []
    for entry in Path("/proc").iterdir():
        args = cmdline(int(entry.name)) if entry.name.isdigit() else []
        if args and args[0].endswith("incusd") and any(str(root) in a for a in args):
            pids.append(int(entry.name))
    return pids


def _mounts_naming(root: Path) -> list[str]:
    """Lines of /proc/self/mountinfo that mention ``root``."""
    return [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(root) in line
    ]


def _loops_naming(root: Path) -> list[str]:
    """Lines of `losetup -a` that mention ``root``."""
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(root) in line]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_shutdown_leaves_nothing(
    private_incus_factory: Callable[[], PrivateIncus], scenario: str
) -> None:
    daemon = private_incus_factory()
    root = daemon.root
    daemon.start()
    server = prepare_server(daemon)
    server.launch("victim", pool=BTRFS_POOL)
    init_pid = daemon.query("/1.0/instances/victim/state")["pid"]
    assert _mounts_naming(root) and _loops_naming(root) and _incusd_pids_for(root)
    assert interface_exists(server.bridge)

    SCENARIOS[scenario](daemon)
    assert cmdline(init_pid), "the container should still run before teardown"
    left = daemon.shutdown()

    assert left == []
    assert _incusd_pids_for(root) == []
    assert not cmdline(init_pid)
    assert _mounts_naming(root) == []
    assert _loops_naming(root) == []
    assert not interface_exists(server.bridge)
    assert not root.exists()
    assert daemon.shutdown() == [], "a second teardown must be a harmless no-op"
