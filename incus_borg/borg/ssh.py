"""How borg reaches a repository over ssh: the BORG_RSH it runs (with keepalives), and ssh's
own messages, which go to a private file because borg may drop them."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import Repository

# ssh options for every ssh connection whose command does not set ServerAlive* itself: a server
# that stops answering at the network level is dropped after about a minute.
KEEPALIVE = {"ServerAliveInterval": "10", "ServerAliveCountMax": "6"}


def is_remote(path: str) -> bool:
    """Whether borg reaches the repository at `path` over ssh (ssh://... or user@host:path)."""
    return path.startswith("ssh://") or re.match(r"(?:[^@/:]+@)?[^@/:]+:(?!//)", path) is not None


def _ssh_words(command: str | None) -> list[str] | None:
    """`command` (default `ssh`) as argv when it runs ssh itself, else None (a wrapper)."""
    words = shlex.split(command or "ssh")
    return words if words and os.path.basename(words[0]) == "ssh" else None


def rsh_command(
    repo: Repository, inherited: str | None = None, ssh_log: Path | None = None
) -> str | None:
    """The BORG_RSH for `repo`: its ssh_command, else the `inherited` BORG_RSH, else `ssh`.

    When that command runs `ssh`, it gets the KEEPALIVE options unless it sets
    ServerAlive* itself, and `-E ssh_log` (ssh's own messages go to that file, read after borg
    ends, since borg may drop them) unless it chose its own -E.
    """
    command = repo.ssh_command or inherited
    if not is_remote(repo.path):
        return repo.ssh_command
    words = _ssh_words(command)
    if words is None:
        return command
    if not any("serveralive" in word.lower() for word in words):
        for name, value in KEEPALIVE.items():
            words += ["-o", f"{name}={value}"]
    if ssh_log is not None and not any(word.startswith("-E") for word in words):
        words += ["-E", str(ssh_log)]
    return shlex.join(words)


@contextlib.contextmanager
def temporary_ssh_log(repo: Repository) -> Iterator[Path | None]:
    """A private file for ssh's own messages, while borg reaches `repo` through ssh."""
    path = new_ssh_log(repo)
    try:
        yield path
    finally:
        if path is not None:
            path.unlink(missing_ok=True)


def new_ssh_log(repo: Repository) -> Path | None:
    """A new private (0600) file for ssh's own messages, when borg reaches `repo` through
    ssh; the caller removes it."""
    if not is_remote(repo.path) or not _ssh_words(repo.ssh_command or os.environ.get("BORG_RSH")):
        return None
    fd, name = tempfile.mkstemp(prefix="incus-borg-ssh-", suffix=".log")
    os.close(fd)
    return Path(name)


def ssh_messages(log: str) -> list[dict[str, Any]]:
    """ssh's own lines (from its -E log) as log messages of borg's shape."""
    return [
        {"type": "log_message", "levelname": "INFO", "name": "ssh", "message": line.strip()}
        for line in log.splitlines()
        if line.strip()
    ]
