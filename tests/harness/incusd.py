"""A private incusd whose whole state lives in one temporary directory.

`PrivateIncus.shutdown()` leaves nothing behind: no process, mount, loop device, bridge or
directory. It never raises; what it could not clean is logged and returned.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from incus_borg.host import mounts
from incus_borg.restore.scratch import OWN_NAMESPACES

log = logging.getLogger(__name__)

INCUSD = Path("/usr/libexec/incus/incusd")
INCUS = "incus"
PREFIX = "incus-borg-test-"
# The daemon fetches instance types from the Internet at start-up and daily; a proxy on a
# closed loopback port makes that fail at once, so nothing leaves the machine.
NO_INTERNET = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}


class IncusError(subprocess.CalledProcessError):
    """An `incus` command failed; unlike its base class the message includes stderr."""

    def __str__(self) -> str:
        err = str(self.stderr or "").strip()
        return f"{shlex.join(self.cmd)} exited {self.returncode}: {err}"


# --- what lives below a directory: processes, mounts, loop devices --------------------------


def is_below(path: str, root: Path) -> bool:
    """True if ``path`` is ``root`` or inside it (purely textual)."""
    top = str(root)
    return path == top or path.startswith(top.rstrip("/") + "/")


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    state: str


def process_table() -> dict[int, _Proc]:
    """Every process visible in /proc, with its parent and state."""
    table: dict[int, _Proc] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry.name)] = _Proc(int(entry.name), int(fields[1]), fields[0])
    return table


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    return [p.pid for p in process_table().values() if p.ppid == pid]


def cmdline(pid: int) -> list[str]:
    """Arguments of ``pid``; empty for zombies and processes that are gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [arg.decode(errors="replace") for arg in raw.split(b"\0") if arg]


def _links(pid: int) -> list[str]:
    """Targets of /proc/PID/{cwd,root,exe} that can be read."""
    targets = []
    for name in ("cwd", "root", "exe"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/{name}"))
        except OSError:
            continue
    return targets


def _ancestors(pid: int, table: dict[int, _Proc]) -> set[int]:
    """``pid`` and all its ancestors (never to be killed: that is us)."""
    seen: set[int] = set()
    while pid > 0 and pid not in seen:
        seen.add(pid)
        pid = table[pid].ppid if pid in table else 0
    return seen


def processes_below(root: Path) -> list[int]:
    """Live processes whose cmdline or cwd/root/exe refers to ``root``, plus their descendants.

    Matches e.g. incusd (``--logfile ROOT/incusd.log``), ``[lxc monitor] ROOT/containers c1``
    and, as its children, the containers' own processes. Excludes this process's ancestry.
    """
    pattern = re.compile(re.escape(str(root).rstrip("/")) + r"(?=[/\s]|$)")
    table = process_table()
    mine = _ancestors(os.getpid(), table)
    hits = {
        p.pid
        for p in table.values()
        if p.state not in "ZX"
        and (
            any(pattern.search(arg) for arg in cmdline(p.pid))
            or any(is_below(link, root) for link in _links(p.pid))
        )
    }
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    todo = list(hits)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in hits:
                hits.add(child)
                todo.append(child)
    return sorted(pid for pid in hits - mine if table[pid].state not in "ZX")


_OCTAL = re.compile(r"\\([0-7]{3})")


def mounts_below(root: Path) -> list[str]:
    """Mount points at or below ``root`` in this mount namespace, deepest first."""
    points = {
        _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), line.split()[4])
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    }
    below = [p for p in points if is_below(p, root)]
    return sorted(below, key=lambda p: (p.count("/"), p), reverse=True)


def loops_below(root: Path) -> list[str]:
    """Loop devices whose backing file is (or was, if deleted) below ``root``."""
    devices = []
    for backing in sorted(Path("/sys/block").glob("loop*/loop/backing_file")):
        try:
            target = backing.read_text().strip().removesuffix(" (deleted)")
        except OSError:
            continue
        if is_below(target, root):
            devices.append(f"/dev/{backing.parent.parent.name}")
    return devices


def interface_exists(name: str) -> bool:
    """True if the host has a network interface called ``name``."""
    return Path("/sys/class/net", name).exists()


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(interval)
    return True


def _run(argv: list[str], timeout: float = 60) -> bool:
    """Run a cleanup command; log (never raise) if it fails."""
    try:
        res = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("%s: %s", shlex.join(argv), exc)
        return False
    if res.returncode:
        log.warning("%s exited %d: %s", shlex.join(argv), res.returncode, res.stderr.strip())
    return res.returncode == 0


def _kill_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            continue


# --- the daemon ----------------------------------------------------------------------------

_CTL_HEAD = """#!/bin/sh
# Generated by tests/harness/incusd.py for one private incusd.
export INCUS_DIR={incus_dir} INCUS_CONF={conf}
pidfile={pidfile}
logfile={logfile}
outfile={outfile}
running() {{
    pid=$(cat "$pidfile" 2>/dev/null) && [ -n "$pid" ] &&
        {{ tr '\\0' '\\n' <"/proc/$pid/cmdline"; }} 2>/dev/null | grep -qxF -- "$logfile"
}}
"""

_CTL_STOP = """# Stop the daemon only (SIGTERM): its instances keep running.
running || exit 0
kill -TERM "$pid" 2>/dev/null || true
i=0
while running; do
    i=$((i + 1))
    if [ "$i" -gt 600 ]; then
        echo "incusd $pid did not stop within 60 s" >&2
        exit 1
    fi
    sleep 0.1
done
"""

_CTL_START = """# Start the daemon fully detached (unless it runs), then wait until it answers.
set -e
if ! running; then
    cd /
    {proxies} setsid nohup {launcher}{incusd} --logfile "$logfile" </dev/null >>"$outfile" 2>&1 &
    echo "$!" >"$pidfile.tmp"
    mv "$pidfile.tmp" "$pidfile"
fi
exec incus admin waitready --timeout 60
"""


class PrivateIncus:
    """One private incusd; ``root`` (a fresh dir under /tmp by default) holds all its state.

    Layout: ``root/incus`` is INCUS_DIR; the log, pidfile, ``ctl/{stop,start}`` scripts and
    client config sit beside it, so they survive a restore that moves INCUS_DIR aside (to a
    sibling such as ``root/incus.incus-borg-old-*``, which teardown also removes).

    With ``netns``, the daemon runs in network and mount namespaces of its own, as the
    drill's scratch daemon does (`incus_borg.restore.scratch`): it may create bridges of the
    same names as another daemon's, and none of them shows on the host; its root is a shared
    mount, so that its pools show here.
    """

    def __init__(
        self, root: Path | None = None, *, prefix: str = PREFIX, netns: bool = False
    ) -> None:
        self.netns = netns
        if root is None:
            root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)  # like /var/lib: container uids may need to traverse it
        self.incus_dir = self.root / "incus"
        self.incus_dir.mkdir(mode=0o711, exist_ok=True)
        self.pidfile = self.root / "incusd.pid"
        self.logfile = self.root / "incusd.log"
        self.outfile = self.root / "incusd.out"  # stdout/stderr: the log again, plus panics
        self.ctl_dir = self.root / "ctl"
        self.bridges: set[str] = set()
        self.env: dict[str, str] = {
            **os.environ,
            "INCUS_DIR": str(self.incus_dir),
            "INCUS_CONF": str(self.root / "client"),
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_ctl_scripts()

    def __repr__(self) -> str:
        return f"PrivateIncus({str(self.root)!r}, pid={self.pid})"

    def __enter__(self) -> PrivateIncus:
        try:
            self.start()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- state --

    @property
    def pid(self) -> int | None:
        """The daemon's pid according to the pidfile (it may have exited since)."""
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None

    def _is_daemon(self, pid: int) -> bool:
        return str(self.logfile) in cmdline(pid)

    def running(self) -> bool:
        """True if this directory's incusd is alive (zombies do not count)."""
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None  # reaped
        pid = self.pid
        return pid is not None and self._is_daemon(pid)

    def log_tail(self, lines: int = 30) -> str:
        """The end of incusd's log and output, for error messages."""
        parts = []
        for path in (self.logfile, self.outfile):
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            parts.append(f"--- {path.name}:\n" + "\n".join(tail))
        return "\n".join(parts) or "(no log)"

    # -- the client --

    def incus(
        self,
        *args: str,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``incus`` client against this daemon; stdout/stderr are decoded text."""
        argv = [INCUS, *args]
        data = input.encode() if isinstance(input, str) else input
        res = subprocess.run(
            argv,
            input=data,
            stdin=subprocess.DEVNULL if data is None else None,
            capture_output=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        out = subprocess.CompletedProcess(
            argv,
            res.returncode,
            res.stdout.decode(errors="replace"),
            res.stderr.decode(errors="replace"),
        )
        if check and out.returncode:
            raise IncusError(out.returncode, argv, out.stdout, out.stderr)
        return out

    def query(self, path: str, method: str = "GET", data: Any = None) -> Any:
        """``incus query``: the parsed JSON answer (None when the answer is empty)."""
        args = ["query", "-X", method]
        if data is not None:
            args += ["--data", json.dumps(data)]
        out = self.incus(*args, path).stdout
        return json.loads(out) if out.strip() else None

    # -- daemon life cycle --

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until the daemon answers; raise with its log tail if it does not, at once if
        it has died."""
        deadline = time.monotonic() + timeout
        while True:
            res = self.incus("admin", "waitready", "--timeout", "2", check=False, timeout=30)
            if res.returncode == 0:
                return
            if not self.running() or time.monotonic() >= deadline:
                raise RuntimeError(
                    f"incusd in {self.root} not ready: {res.stderr.strip()}\n{self.log_tail()}"
                )

    def start(self, timeout: float = 60) -> None:
        """Start incusd (unless it runs) in its own session and wait until it answers."""
        if not self.running():
            if self.netns and not mounts.is_mounted(self.root):
                mounts.share(self.root)
            with self.outfile.open("ab") as out:
                self._proc = subprocess.Popen(
                    [*self.launcher, str(INCUSD), "--logfile", str(self.logfile)],
                    env={**self.env, **NO_INTERNET},
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                    start_new_session=True,
                )
            tmp = self.pidfile.with_suffix(".tmp")
            tmp.write_text(f"{self._proc.pid}\n")
            tmp.replace(self.pidfile)
        self.wait_ready(timeout)

    @property
    def launcher(self) -> tuple[str, ...]:
        """What runs incusd: nothing, or a new network namespace."""
        return OWN_NAMESPACES if self.netns else ()

    def start_daemon(self, timeout: float = 60) -> None:
        """Start the daemon again after `stop_daemon()`; it re-attaches to running instances."""
        self.start(timeout)

    def stop_daemon(self, timeout: float = 60) -> None:
        """SIGTERM the daemon only (instances keep running) and wait until it has exited."""
        pid = self.pid
        if pid is None or not self.running():
            return
        os.kill(pid, signal.SIGTERM)
        if not wait_for(lambda: not self._is_daemon(pid), timeout):
            raise TimeoutError(f"incusd {pid} did not exit within {timeout} s")
        self.running()  # reaps our child

    def stop_command(self) -> str:
        """Shell command that stops this daemon only (like `systemctl stop incus`)."""
        return shlex.quote(str(self.ctl_dir / "stop"))

    def start_command(self) -> str:
        """Shell command that starts this daemon detached and waits until it is ready."""
        return shlex.quote(str(self.ctl_dir / "start"))

    def _write_ctl_scripts(self) -> None:
        q = shlex.quote
        head = _CTL_HEAD.format(
            incus_dir=q(str(self.incus_dir)),
            conf=q(self.env["INCUS_CONF"]),
            pidfile=q(str(self.pidfile)),
            logfile=q(str(self.logfile)),
            outfile=q(str(self.outfile)),
        )
        proxies = " ".join(f"{k}={q(v)}" for k, v in NO_INTERNET.items())
        self.ctl_dir.mkdir(exist_ok=True)
        for name, body in (
            ("stop", _CTL_STOP),
            (
                "start",
                _CTL_START.format(
                    incusd=INCUSD,
                    proxies=proxies,
                    launcher="".join(q(word) + " " for word in self.launcher),
                ),
            ),
        ):
            script = self.ctl_dir / name
            script.write_text(head + body)
            script.chmod(0o755)

    # -- teardown --

    def leftovers(self) -> list[str]:
        """What still exists of this daemon: processes, mounts, loops, bridges, the dir."""
        items = [f"process {pid}: {' '.join(cmdline(pid))}" for pid in processes_below(self.root)]
        items += [f"mount {point}" for point in mounts_below(self.root)]
        items += [f"loop device {dev}" for dev in loops_below(self.root)]
        items += [f"bridge {name}" for name in sorted(self.bridges) if interface_exists(name)]
        if self.root.exists():
            items.append(f"directory {self.root}")
        return items

    def shutdown(self, timeout: float = 60, revive: bool = True) -> list[str]:
        """Tear everything down, even if the daemon is dead; return (and log) what is left.

        A stopped daemon whose instances or mounts remain is started again to shut down
        cleanly, unless `revive` is false (a cluster member whose peers are gone would wait
        for their quorum). Idempotent and never raises (except KeyboardInterrupt and the like).
        """
        steps: list[tuple[str, Callable[[], None]]] = [
            ("shut down the daemon", lambda: self._shutdown_gracefully(timeout, revive)),
            ("kill the daemon", self._kill_daemon),
            ("kill leftover processes", self._kill_processes),
            ("unmount", self._unmount),
            ("detach loop devices", self._detach_loops),
            ("delete bridges", self._delete_bridges),
            ("remove the directory", self._remove_root),
        ]
        for what, step in steps:
            try:
                step()
            except Exception:
                log.exception("teardown of %s: could not %s", self.root, what)
        left = self.leftovers()
        for item in left:
            log.warning("teardown of %s left %s", self.root, item)
        return left

    def _shutdown_gracefully(self, timeout: float, revive: bool = True) -> None:
        """`incus admin shutdown` (reviving a stopped daemon first if instances still run)."""
        if not self.root.exists():
            return
        if (
            revive
            and not self.running()
            and (self.incus_dir / "database").is_dir()
            and (processes_below(self.root) or mounts_below(self.root))
        ):
            log.info("reviving incusd in %s to shut it down cleanly", self.root)
            self.start(timeout=30)
        if not self.running():
            return
        self._remember_bridges()
        res = self.incus(
            "admin", "shutdown", "--timeout", str(int(timeout)), check=False, timeout=timeout + 30
        )
        if res.returncode:
            log.warning("incus admin shutdown in %s: %s", self.root, res.stderr.strip())
        if not wait_for(lambda: not self.running(), 30):
            log.warning("incusd in %s still alive after admin shutdown", self.root)

    def _remember_bridges(self) -> None:
        """Record the managed bridges of this daemon, so teardown can delete them (those in a
        namespace of its own go with it, and another daemon's may have the same names)."""
        if self.netns:
            return
        for path in ("/1.0/networks?recursion=1&all-projects=true", "/1.0/networks?recursion=1"):
            try:
                networks = self.query(path)
            except (IncusError, subprocess.SubprocessError, ValueError):
                continue
            self.bridges.update(
                n["name"] for n in networks if n.get("managed") and n.get("type") == "bridge"
            )
            return

    def _kill_daemon(self) -> None:
        pid = self.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if pid is None or not self.running():
                return
            log.warning("sending %s to incusd %d of %s", sig.name, pid, self.root)
            _kill_all([pid], sig)
            wait_for(lambda: not self.running(), 10)

    def _kill_processes(self) -> None:
        for _ in range(3):
            pids = processes_below(self.root)
            if not pids:
                return
            log.warning("killing leftover processes of %s: %s", self.root, pids)
            _kill_all(pids, signal.SIGKILL)
            wait_for(functools.partial(self._all_gone, pids), 10)

    def _all_gone(self, pids: list[int]) -> bool:
        return not set(pids) & set(processes_below(self.root))

    def _unmount(self) -> None:
        for _ in range(3):
            points = mounts_below(self.root)
            if not points:
                return
            for point in points:
                if not _run(["umount", point]):
                    _run(["umount", "-l", point])

    def _detach_loops(self) -> None:
        for dev in loops_below(self.root):
            _run(["losetup", "-d", dev])

    def _delete_bridges(self) -> None:
        for name in sorted(self.bridges):
            if interface_exists(name):
                _run(["ip", "link", "del", name])

    def _remove_root(self) -> None:
        if not self.root.exists():
            return
        if mounts_below(self.root):
            log.warning("not removing %s: something is still mounted below it", self.root)
            return

        def report(func: Callable[..., Any], path: str, exc_info: Any) -> None:
            log.warning("cannot remove %s: %s", path, exc_info[1])

        shutil.rmtree(self.root, onerror=report)
