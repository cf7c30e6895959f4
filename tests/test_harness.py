"""The harness itself: pools, projects, ownership, and stopping only the daemon."""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable

import pytest
from harness.incusd import PrivateIncus, cmdline
from harness.server import BTRFS_POOL, DEFAULT_POOL, SECOND_PROJECT, IncusServer

pytestmark = pytest.mark.incus


def _root_pool(server: IncusServer, name: str, project: str | None) -> str:
    suffix = f"?project={project}" if project else ""
    instance = server.daemon.query(f"/1.0/instances/{name}{suffix}")
    pool: str = instance["expanded_devices"]["root"]["pool"]
    return pool


@pytest.mark.parametrize(
    ("pool", "project"),
    [(DEFAULT_POOL, None), (BTRFS_POOL, None), (DEFAULT_POOL, SECOND_PROJECT)],
    ids=["dir", "btrfs", "project-second"],
)
def test_exec_write_reads_back_same_checksum(
    incus_server: IncusServer, pool: str, project: str | None
) -> None:
    name = f"sum-{pool}-{project or 'default'}"
    data = os.urandom(64 * 1024) + b"\0\n end"
    incus_server.launch(name, pool=pool, project=project)
    try:
        assert _root_pool(incus_server, name, project) == pool
        write = "mkdir -p /root/data && cat >/root/data/blob"
        incus_server.exec(name, "sh", "-c", write, project=project, input=data)
        sums = incus_server.checksums(name, project=project)
        assert sums["/root/data/blob"] == hashlib.sha256(data).hexdigest()
        assert "/etc/passwd" in sums
    finally:
        incus_server.delete(name, project=project)


def test_file_owned_by_uid_1000_inside(incus_server: IncusServer) -> None:
    content = b"owned by user\n"
    path = "/home/user/notes/owned.txt"
    incus_server.launch("owner", files={path: (content, 1000, 1000, 0o640)})
    try:
        assert incus_server.owner("owner", path) == (1000, 1000)
        mode = incus_server.exec("owner", "stat", "-c", "%a", path).stdout.strip()
        assert mode == "640"
        sums = incus_server.checksums("owner", ["/home/user"])
        assert sums == {path: hashlib.sha256(content).hexdigest()}
    finally:
        incus_server.delete("owner")


@pytest.mark.parametrize("how", ["incus-stop", "TERM", "INT"])
def test_tiny_image_stops_promptly(incus_server: IncusServer, how: str) -> None:
    """/sbin/init leaves at once on SIGPWR (`incus stop`), SIGTERM and SIGINT."""
    name = f"stop-{how.lower()}"
    incus_server.launch(name)
    init_pid = incus_server.daemon.query(f"/1.0/instances/{name}/state")["pid"]
    try:
        started = time.monotonic()
        if how == "incus-stop":
            incus_server.daemon.incus("stop", name)
        else:
            os.kill(init_pid, signal.Signals[f"SIG{how}"])
            assert incus_server.wait_state(name, "Stopped", timeout=5)
        assert time.monotonic() - started < 5
        assert incus_server.state(name) == "Stopped"
    finally:
        incus_server.delete(name)


Controls = tuple[Callable[[], None], Callable[[], None]]  # (stop, start)


def _run(command: str) -> None:
    """Run a stop/start command as incus-borg does: split like a shell, with output captured
    (a start command that left incusd holding the pipes would hang here)."""
    subprocess.run(shlex.split(command), check=True, timeout=120, capture_output=True)


def _by_methods(daemon: PrivateIncus) -> Controls:
    return daemon.stop_daemon, daemon.start_daemon


def _by_commands(daemon: PrivateIncus) -> Controls:
    return (lambda: _run(daemon.stop_command())), (lambda: _run(daemon.start_command()))


@pytest.mark.parametrize("controls", [_by_methods, _by_commands], ids=["methods", "commands"])
def test_daemon_only_stop_keeps_instances_running(
    incus_server: IncusServer, controls: Callable[[PrivateIncus], Controls]
) -> None:
    daemon = incus_server.daemon
    stop, start = controls(daemon)
    incus_server.launch("survivor")
    try:
        init_pid = daemon.query("/1.0/instances/survivor/state")["pid"]
        old_daemon = daemon.pid
        stop()
        assert not daemon.running()
        assert cmdline(init_pid), "the container's init died with the daemon"
        start()
        assert daemon.running() and daemon.pid != old_daemon
        assert incus_server.state("survivor") == "Running"
        assert daemon.query("/1.0/instances/survivor/state")["pid"] == init_pid
        assert incus_server.exec("survivor", "echo", "alive").stdout == "alive\n"
    finally:
        daemon.start_daemon()
        incus_server.delete("survivor")
