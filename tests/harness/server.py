"""A private Incus prepared like a small real server, with helpers to fill and inspect it."""

from __future__ import annotations

import secrets
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .image import ALIAS, import_image
from .incusd import IncusError, PrivateIncus, interface_exists, wait_for

# path inside the instance -> (content, uid, gid, mode)
FileSpec = tuple[bytes, int, int, int]

DEFAULT_POOL = "default"
BTRFS_POOL = "fast"
SECOND_PROJECT = "second"
CHECKSUM_PATHS = ("/root", "/home", "/etc")
STOP_SIGNALS = (signal.SIGPWR, signal.SIGTERM, signal.SIGINT)


def unique_bridge_name(prefix: str = "ibt") -> str:
    """A bridge name (at most 15 chars) that no host interface uses yet."""
    while True:
        name = f"{prefix}{secrets.token_hex(4)}"
        if not interface_exists(name):
            return name


def _catches(pid: int, signals: Sequence[signal.Signals]) -> bool:
    """True if process ``pid`` has handlers for all ``signals`` (from /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("SigCgt:")), 16)
    return all(caught >> (sig - 1) & 1 for sig in signals)


def _project(project: str | None) -> list[str]:
    return ["--project", project] if project else []


@dataclass
class IncusServer:
    """A prepared private Incus: pools ``default`` (dir) and ``fast`` (btrfs), a bridge,
    project ``second`` and the ``tiny`` image."""

    daemon: PrivateIncus
    bridge: str
    image: str = ALIAS
    pools: tuple[str, ...] = (DEFAULT_POOL, BTRFS_POOL)
    projects: tuple[str, ...] = ("default", SECOND_PROJECT)
    fingerprint: str = ""

    def exec(
        self,
        name: str,
        *command: str,
        project: str | None = None,
        input: str | bytes | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside instance ``name``."""
        return self.daemon.incus(
            "exec", *_project(project), name, "--", *command, input=input, check=check
        )

    def launch(
        self,
        name: str,
        pool: str = DEFAULT_POOL,
        project: str | None = None,
        files: Mapping[str, FileSpec] | None = None,
        start: bool = True,
    ) -> None:
        """Create container ``name`` from the tiny image on ``pool``, write ``files``, start it."""
        self.daemon.incus("init", self.image, name, "--storage", pool, *_project(project))
        for path, spec in (files or {}).items():
            self.push_file(name, path, *spec, project=project)
        if start:
            self.start(name, project=project)

    def start(self, name: str, project: str | None = None, timeout: float = 10) -> None:
        """Start ``name`` and wait until its init handles the stop signals.

        PID 1 ignores signals it has no handler for: a stop signal sent before busybox has run
        ``trap`` would be lost. (Measured: the traps are already set when `incus start` returns.)
        """
        self.daemon.incus("start", name, *_project(project))
        suffix = f"?project={project}" if project else ""
        pid = int(self.daemon.query(f"/1.0/instances/{name}/state{suffix}")["pid"])
        if not wait_for(lambda: _catches(pid, STOP_SIGNALS), timeout):
            raise TimeoutError(f"init of {name} (pid {pid}) did not set its signal traps")

    def delete(self, name: str, project: str | None = None) -> None:
        """Delete instance ``name``, stopping it first if it runs."""
        self.daemon.incus("delete", "--force", name, *_project(project))

    def push_file(
        self,
        name: str,
        path: str,
        content: bytes,
        uid: int = 0,
        gid: int = 0,
        mode: int = 0o644,
        project: str | None = None,
    ) -> None:
        """Write one file into instance ``name`` (running or not), creating its parents."""
        with tempfile.NamedTemporaryFile(dir=self.daemon.root) as tmp:
            tmp.write(content)
            tmp.flush()
            owner = ["--uid", str(uid), "--gid", str(gid), "--mode", f"{mode:04o}"]
            target = f"{name}{path}"
            self.daemon.incus("file", "push", *_project(project), "-p", *owner, tmp.name, target)

    def checksums(
        self,
        name: str,
        paths: Sequence[str] | None = None,
        project: str | None = None,
    ) -> dict[str, str]:
        """sha256 of every regular file below ``paths`` (that exist), read inside the instance."""
        script = (
            'for p in "$@"; do if [ -e "$p" ]; then '
            'find "$p" -type f -exec sha256sum {} + || exit 1; fi; done'
        )
        out = self.exec(
            name, "sh", "-c", script, "sh", *(paths or CHECKSUM_PATHS), project=project
        ).stdout
        sums: dict[str, str] = {}
        for line in out.splitlines():
            digest, _, path = line.partition("  ")
            sums[path] = digest
        return sums

    def owner(self, name: str, path: str, project: str | None = None) -> tuple[int, int]:
        """(uid, gid) of ``path`` as seen inside the instance."""
        uid, gid = self.exec(name, "stat", "-c", "%u %g", path, project=project).stdout.split()
        return int(uid), int(gid)

    def state(self, name: str, project: str | None = None) -> str:
        """The instance's status (``Running``, ``Stopped``, ...), or ``"Busy"`` while Incus is
        still handling a stop: for about half a second after the init exits on its own,
        ``/state`` fails ("Invalid PID") and the two endpoints disagree."""
        suffix = f"?project={project}" if project else ""
        try:
            live = self.daemon.query(f"/1.0/instances/{name}/state{suffix}")["status"]
        except IncusError:
            return "Busy"
        recorded = self.daemon.query(f"/1.0/instances/{name}{suffix}")["status"]
        return str(live) if live == recorded else "Busy"

    def wait_state(
        self, name: str, status: str, project: str | None = None, timeout: float = 10
    ) -> bool:
        """Wait until the instance settles in ``status``; False on timeout."""
        return wait_for(lambda: self.state(name, project) == status, timeout, interval=0.1)


def _incus_retrying(daemon: PrivateIncus, argv: list[str], attempts: int = 3) -> None:
    """Run an incus command, again when it lost a race with a vanishing host interface.

    Creating a bridge lists every host interface: a veth of another daemon's container that
    disappears meanwhile fails it with "Device ... does not exist".
    """
    for attempt in range(attempts):
        try:
            daemon.incus(*argv)
            return
        except IncusError as exc:
            if "does not exist" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(1)


def prepare_server(daemon: PrivateIncus, btrfs_size: str = "1GiB") -> IncusServer:
    """Set up pools, bridge, project and image on a started daemon."""
    bridge = unique_bridge_name()
    daemon.bridges.add(bridge)  # registered first so that teardown deletes it in any case
    shared = ["-c", "features.images=false", "-c", "features.profiles=false"]
    commands: list[list[str]] = [
        ["storage", "create", DEFAULT_POOL, "dir"],
        ["storage", "create", BTRFS_POOL, "btrfs", f"size={btrfs_size}"],
        ["network", "create", bridge, "ipv4.address=none", "ipv6.address=none"],
        ["profile", "device", "add", "default", "root", "disk", "path=/", f"pool={DEFAULT_POOL}"],
        ["profile", "device", "add", "default", "eth0", "nic", f"network={bridge}", "name=eth0"],
        ["project", "create", SECOND_PROJECT, *shared],
    ]
    for argv in commands:
        _incus_retrying(daemon, argv)
    fingerprint = import_image(daemon, daemon.root / "image-build")
    return IncusServer(daemon=daemon, bridge=bridge, fingerprint=fingerprint)
