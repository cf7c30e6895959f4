"""The only code that runs `incus`: API queries and client commands against one Incus directory."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
        input: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Run `incus ARGS...` and return its stdout; failures become one-line UserErrors."""
        argv = ["incus", *args]
        try:
            done = subprocess.run(
                argv,
                input=input,
                capture_output=True,
                text=True,
                env=self.env(),
                timeout=timeout or self.timeout,
                check=False,
            )
        except FileNotFoundError:
            raise UserError("the incus client is not installed: install the incus package") from None
        except subprocess.TimeoutExpired:
            raise UserError(
                f"`incus {' '.join(args[:3])}` did not finish within {timeout or self.timeout:.0f} s"
            ) from None
        if done.returncode != 0:
            raise self._failure(args, done.stderr)
        return done.stdout

    def _failure(self, args: Sequence[str], stderr: str) -> UserError:
        """Turn a failed call's stderr into one line naming the cause."""
        text = stderr.strip()
        if any(sign in text.lower() for sign in UNREACHABLE_SIGNS) or not self.socket.exists():
            return UserError(f"Incus is not reachable at {self.socket}: is incusd running?")
        last = text.splitlines()[-1] if text else "no message"
        return UserError(f"`incus {' '.join(args[:3])}` failed: {last.removeprefix('Error: ')}")

    def query(self, path: str, method: str = "GET", data: Any = None) -> Any:
        """Call the REST API through `incus query` and return the decoded JSON."""
        args = ["query", "--wait", "-X", method, path]
        if data is not None:
            args += ["--data", json.dumps(data)]
        out = self.run(args)
        return json.loads(out) if out.strip() else None

    def server_info(self) -> dict[str, Any]:
        """GET /1.0: server environment and configuration."""
        return dict(self.query("/1.0"))
