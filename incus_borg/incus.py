"""The only code that runs `incus`: API queries and client commands against one Incus directory."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlencode

from .errors import UserError

DEFAULT_TIMEOUT = 120.0
UNREACHABLE_SIGNS = ("connect: no such file", "connection refused", "unix.socket: connect")


class Incus:
    """Runs the `incus` client with INCUS_DIR set to one server's directory."""

    def __init__(self, directory: str | Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.dir = Path(directory)
        self.timeout = timeout

    @property
    def socket(self) -> Path:
        """The daemon's unix socket."""
        return self.dir / "unix.socket"

    def env(self) -> dict[str, str]:
        """The environment for every incus call."""
        return {**os.environ, "INCUS_DIR": str(self.dir)}

    def run(
        self,
        args: Sequence[str],
        *,
        stdin: IO[bytes] | None = None,
        timeout: float | None = None,
    ) -> str:
        """Run `incus ARGS...` (reading `stdin` when given) and return its stdout; failures
        become one-line UserErrors."""
        limit = timeout or self.timeout
        missing = "the incus client is not installed: install the incus package"
        slow = f"`incus {' '.join(args[:3])}` did not finish within {limit:.0f} s"
        done = self._execute(["incus", *args], stdin, limit, missing, slow)
        if done.returncode != 0:
            raise self._failure(args, done.stderr.decode("utf-8", "replace"))
        return done.stdout.decode("utf-8", "replace")

    def _execute(
        self, argv: list[str], stdin: IO[bytes] | None, timeout: float, missing: str, slow: str
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a command with this server's environment; a missing program or a timeout
        becomes a UserError with the given message."""
        try:
            return subprocess.run(
                argv,
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                env=self.env(),
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError:
            raise UserError(missing) from None
        except subprocess.TimeoutExpired:
            raise UserError(slow) from None

    def _failure(self, args: Sequence[str], stderr: str) -> UserError:
        """Turn a failed call's stderr into one line naming the cause."""
        text = stderr.strip()
        if any(sign in text.lower() for sign in UNREACHABLE_SIGNS) or not self.socket.exists():
            return UserError(f"Incus is not reachable at {self.socket}: is incusd running?")
        last = text.splitlines()[-1] if text else "no message"
        what = " ".join([a for a in args if not a.startswith("-")][:3])
        return UserError(f"`incus {what}` failed: {last.removeprefix('Error: ')}")

    def query(self, path: str, method: str = "GET", data: Any = None) -> Any:
        """Call the REST API through `incus query` and return the decoded JSON."""
        args = ["query", "--wait", "-X", method, path]
        if data is not None:
            args += ["--data", json.dumps(data)]
        out = self.run(args)
        return json.loads(out) if out.strip() else None

    def run_daemon_command(self, command: str, what: str, timeout: float = 120) -> float:
        """Run incus.stop_command or incus.start_command (split like a shell, run without one).

        Returns how long it took.
        """
        started = time.monotonic()
        missing = f"incus.{what} {command!r}: command not found; fix incus.{what}"
        slow = f"incus.{what} {command!r} did not finish within {timeout:.0f} s"
        done = self._execute(shlex.split(command), None, timeout, missing, slow)
        if done.returncode != 0:
            lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
            detail = (lines or [f"exit {done.returncode}"])[-1]
            raise UserError(f"incus.{what} {command!r} failed: {detail}")
        return time.monotonic() - started

    def feed(self, args: Sequence[str], stdin: IO[bytes], timeout: float = 24 * 3600) -> None:
        """Run `incus ARGS...` reading a stream (such as a backup tarball) from `stdin`."""
        self.run(["--quiet", *args], stdin=stdin, timeout=timeout)

    def reachable(self) -> bool:
        """Whether the daemon answers on its socket."""
        try:
            self.run(["query", "/1.0"], timeout=10)
        except UserError:
            return False
        return True

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until the daemon has started and answers."""
        self.run(["admin", "waitready", "--timeout", str(int(timeout))], timeout=timeout + 10)

    def sql_dump(self, scope: str) -> str:
        """`incus admin sql local|global .dump`: the database as SQL text."""
        return self.run(["admin", "sql", scope, ".dump"])

    # --- instances and volumes -----------------------------------------------------------

    def instance_status(self, project: str, name: str) -> str:
        """Running, Stopped or Frozen."""
        return str(self.query(api_path(f"/1.0/instances/{quote(name)}/state", project))["status"])

    def change_state(self, project: str, name: str, action: str) -> None:
        """freeze, unfreeze, stop or start an instance (stop waits up to 60 s, then forces)."""
        data: dict[str, Any] = {"action": action}
        if action == "stop":
            data |= {"timeout": 60, "force": False}
        self.query(api_path(f"/1.0/instances/{quote(name)}/state", project), "PUT", data)

    def instance_snapshots(self, project: str, name: str) -> list[str]:
        """Names of an instance's snapshots, oldest first."""
        urls = self.query(api_path(f"/1.0/instances/{quote(name)}/snapshots", project))
        return [u.rsplit("/", 1)[-1].split("?")[0] for u in urls]

    def create_instance_snapshot(self, project: str, name: str, snap: str) -> None:
        """Take a (stateless) snapshot of an instance."""
        path = api_path(f"/1.0/instances/{quote(name)}/snapshots", project)
        self.query(path, "POST", {"name": snap, "stateful": False})

    def delete_instance_snapshot(self, project: str, name: str, snap: str) -> None:
        """Delete one snapshot of an instance."""
        path = f"/1.0/instances/{quote(name)}/snapshots/{quote(snap)}"
        self.query(api_path(path, project), "DELETE")

    def volume_snapshots(self, pool: str, project: str, name: str) -> list[str]:
        """Names of a custom volume's snapshots, oldest first."""
        path = f"/1.0/storage-pools/{quote(pool)}/volumes/custom/{quote(name)}/snapshots"
        return [u.rsplit("/", 1)[-1].split("?")[0] for u in self.query(api_path(path, project))]

    def create_volume_snapshot(self, pool: str, project: str, name: str, snap: str) -> None:
        """Take a snapshot of a custom volume."""
        path = f"/1.0/storage-pools/{quote(pool)}/volumes/custom/{quote(name)}/snapshots"
        self.query(api_path(path, project), "POST", {"name": snap})

    def delete_volume_snapshot(self, pool: str, project: str, name: str, snap: str) -> None:
        """Delete one snapshot of a custom volume."""
        path = (
            f"/1.0/storage-pools/{quote(pool)}/volumes/custom/{quote(name)}/snapshots/{quote(snap)}"
        )
        self.query(api_path(path, project), "DELETE")


def api_path(path: str, project: str | None = None, **params: str) -> str:
    """An API path with its query string (project and other parameters)."""
    if project is not None:
        params = {"project": project, **params}
    return f"{path}?{urlencode(params)}" if params else path
