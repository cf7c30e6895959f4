"""A private sshd on 127.0.0.1 serving Borg repositories through a restricted key."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def small_disk(path: Path, size: str = "1m") -> Iterator[Path]:
    """A new directory `path` on its own tmpfs of `size` (a disk that fills up), unmounted
    and removed afterwards."""
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
        path.rmdir()


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
        self._configure(root / "host_key")

    def _configure(self, host_key: Path) -> None:
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}\n"
            f"PidFile {self.root / 'sshd.pid'}\n"
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

    @contextmanager
    def other_host_key(self) -> Iterator[None]:
        """Serve with another host key for the duration (a reinstalled server, or an impostor
        on its address): clients that pinned the usual key must refuse it."""
        other = self.root / "other_host_key"
        if not other.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True
            )
        self.stop()
        self._configure(other)
        self.start()
        try:
            yield
        finally:
            self.stop()
            self._configure(self.root / "host_key")
            self.start()

    def small_disk(self, name: str, size: str = "1m") -> AbstractContextManager[Path]:
        """A served directory `name` on its own small disk (see `small_disk`)."""
        return small_disk(self.repos / name, size)

    def serve_pids(self) -> list[int]:
        """The `borg serve` processes running for this sshd's clients now."""
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if "serve" in argv and str(self.repos) in argv:
                found.append(int(proc.name))
        return found
