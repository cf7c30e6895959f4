"""A private sshd on 127.0.0.1 serving Borg repositories through a restricted key."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateSshd:
    """sshd with its own host key, config and authorized_keys, for `borg serve`."""

    def __init__(self, root: Path, *, append_only: bool = True) -> None:
        self.root = root
        self.repos = root / "repos"
        self.port = free_port()
        self.client_key = root / "client_key"
        self.known_hosts = root / "known_hosts"
        self.config = root / "sshd_config"
        self.append_only = append_only
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.repos.mkdir(exist_ok=True)
        for key in (root / "host_key", self.client_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
        borg = Path(sys.executable).parent / "borg"
        serve = f"{borg} serve --restrict-to-path {self.repos}"
        if append_only:
            serve += " --append-only"
        public = (root / "client_key.pub").read_text().strip()
        (root / "authorized_keys").write_text(f'command="{serve}",restrict {public}\n')
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
            f"AuthorizedKeysFile {root / 'authorized_keys'}\nPidFile {root / 'sshd.pid'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n"
            "StrictModes no\nLogLevel ERROR\n"
        )

    @property
    def ssh_command(self) -> str:
        """The BORG_RSH a client uses: its key, this host's key pinned."""
        options = [
            "-i", str(self.client_key), "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "StrictHostKeyChecking=accept-new", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=5",
        ]  # fmt: skip
        return shlex.join(["ssh", *options])

    def url(self, name: str) -> str:
        """The ssh:// URL of repository `name` below the served directory."""
        return f"ssh://root@127.0.0.1:{self.port}{self.repos / name}"

    def start(self) -> None:
        """Start sshd in the foreground (as a child) and wait until it accepts connections."""
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=(self.root / "sshd.log").open("ab"),
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"sshd on port {self.port} did not start: see {self.root / 'sshd.log'}")

    def stop(self) -> None:
        """Stop sshd (idempotent)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None
