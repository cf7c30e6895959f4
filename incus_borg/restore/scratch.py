"""A throwaway Incus daemon in a temporary directory, in network and mount namespaces of its
own, and its complete removal.

Its bridges and their addresses exist only in its network namespace, so restored networks
never meet the host's; its mount namespace only gives it a `/sys` of that network namespace
(namespaces.py). The directory is bind-mounted onto itself as a shared mount first, so that
the pools the daemon mounts below it show on the host too (restores write into them).

`teardown` removes everything, and works from the directory alone, so that the leftovers of
a killed drill are removed by the next one: the daemon and every process naming the
directory (with their descendants), mounts, loop devices, and the directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import UserError
from ..host import mounts
from ..incus import Incus

INCUSD = (
    "/usr/libexec/incus/incusd",
    "/usr/lib/incus/incusd",
    "/opt/incus/bin/incusd",
    "/usr/bin/incusd",
    "/usr/sbin/incusd",
)
# Runs a command in network and mount namespaces of its own (see namespaces.py).
OWN_NAMESPACES = (
    "unshare",
    "--net",
    "--mount",
    "--propagation",
    "unchanged",
    "--",
    sys.executable,
    "-m",
    "incus_borg.restore.namespaces",
)
START_TIMEOUT = 60
PREFIX = "incus-borg-drill-"


def incusd() -> str:
    """The Incus daemon's executable."""
    for candidate in INCUSD:
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("incusd")
    if found is None:
        raise UserError("no incusd found (looked in " + ", ".join(INCUSD) + " and on PATH)")
    return found


class Scratch:
    """One scratch daemon: `root` holds its Incus directory (`root/incus`), log and output."""

    def __init__(self, root: Path) -> None:
        if not root.is_absolute() or not root.name.startswith(PREFIX):
            raise UserError(f"{root} is not a scratch directory of a drill ({PREFIX}...)")
        self.root = root
        self.dir = root / "incus"
        self.netns: int | None = None  # inode of its network namespace, once started (shown)
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls, parent: Path) -> Scratch:
        """A new, empty scratch directory below `parent`."""
        root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))
        os.chmod(root, 0o711)  # container uids traverse it to their root file systems
        return cls(root)

    @property
    def incus(self) -> Incus:
        """The scratch daemon's API."""
        return Incus(self.dir)

    def start(self) -> None:
        """Start the daemon in its namespaces and wait until it answers."""
        self.dir.mkdir(mode=0o711, exist_ok=True)
        mounts.share(self.root)
        argv = [*OWN_NAMESPACES, incusd(), "--logfile", str(self.root / "incusd.log")]
        with (self.root / "incusd.out").open("ab") as out:
            self.proc = subprocess.Popen(
                argv,
                env={**os.environ, "INCUS_DIR": str(self.dir)},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not self.incus.reachable():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise UserError(f"the scratch Incus daemon did not start: {self._last_words()}")
            time.sleep(0.1)
        self.netns = os.stat(f"/proc/{self.proc.pid}/ns/net").st_ino

    def _last_words(self) -> str:
        try:
            lines = (self.root / "incusd.out").read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return lines[-1] if lines else "no message"

    # --- teardown ------------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Remove everything of the scratch daemon; what could not be removed."""
        if self.incus.reachable():
            with contextlib.suppress(UserError):  # what it leaves is killed below
                self.incus.shutdown(30)
        for _ in range(3):
            pids = self.processes()
            if not pids:
                break
            for pid in pids:
                _kill(pid)
            _wait_gone(self, pids)
        if self.proc is not None:
            self.proc.poll()  # reap our child
        for point in mounts.mounts_below(self.root):
            mounts.unmount_or_detach(point)
        for device in self.loops():
            subprocess.run(["losetup", "-d", device], capture_output=True, check=False, timeout=60)
        if os.path.lexists(self.root) and not mounts.mounts_below(self.root):
            mounts.remove_tree(self.root)
        return self.leftovers()

    def leftovers(self) -> list[str]:
        """What is left of the scratch daemon: processes, mounts, loop devices, directory."""
        left = [f"process {pid}" for pid in self.processes()]
        left += [f"mount {point}" for point in mounts.mounts_below(self.root)]
        left += [f"loop device {device}" for device in self.loops()]
        if os.path.lexists(self.root):
            left.append(f"directory {self.root}")
        return left

    def processes(self) -> list[int]:
        """Processes whose command line, working directory, root or executable lies below the
        directory (the daemon, container monitors, containers), with their descendants (what
        the daemon runs, such as dnsmasq)."""
        table = _process_table()
        mine: set[int] = set()  # this process and its ancestors (a shell may name the directory)
        pid = os.getpid()
        while pid in table and pid not in mine:
            mine.add(pid)
            pid = table[pid]
        hits = {pid for pid in table if pid not in mine and self._belongs(pid)}
        todo = list(hits)
        while todo:
            parent = todo.pop()
            for pid, ppid in table.items():
                if ppid == parent and pid not in hits and pid not in mine:
                    hits.add(pid)
                    todo.append(pid)
        return sorted(hits)

    def _belongs(self, pid: int) -> bool:
        """Whether a process names the directory (never judged by its network namespace: a
        namespace's inode may be another's once it is gone)."""
        below = re.compile(re.escape(str(self.root)) + r"(?=[/\s]|$)")
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return False
        links = []
        for name in ("cwd", "root", "exe"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/{pid}/{name}"))
        # An argument may hold the directory anywhere: `[lxc monitor] <dir>/containers NAME`.
        return any(below.search(word) for word in words) or any(below.match(link) for link in links)

    def loops(self) -> list[str]:
        """Loop devices whose backing file is below the directory."""
        found = []
        for backing in sorted(Path("/sys/block").glob("loop*/loop/backing_file")):
            try:
                target = backing.read_text().strip().removesuffix(" (deleted)")
            except OSError:
                continue
            if target.startswith(str(self.root) + "/"):
                found.append(f"/dev/{backing.parent.parent.name}")
        return found


def _process_table() -> dict[int, int]:
    """pid -> parent pid of every live process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] not in "ZX":
                table[int(entry.name)] = int(fields[1])
    return table


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _wait_gone(scratch: Scratch, pids: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while set(pids) & set(scratch.processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
