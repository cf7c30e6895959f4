"""What went wrong in a failed borg call, named in one line with the fix: from borg's
--log-json, the server's traceback it forwards, and ssh's messages."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..config import Repository
from .result import BorgResult
from .ssh import is_remote

# Connection closed / broken (ssh:// repositories): retried with a doubling delay.
CONNECTION_FAILURES = (80, 81, 87)

_HOST_KEY = re.compile(
    r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED"
    r"|host key for .* has changed|No \S+ host key is known for",
    re.I,
)

_HOST_KEY_DETAIL = re.compile(r"Host key for .* has changed.*|No \S+ host key is known for .*")

_DENIED = re.compile(r"Permission denied \((?:[\w-]+,)*publickey")

_NO_IDENTITY = re.compile(r"Identity file (.+?) not accessible")

_NO_SPACE = re.compile(
    r"No space left on device|\[Errno 28\]|Disk quota exceeded|\[Errno 122\]"
    r"|Insufficient free space|storage quota .*exceeded",
    re.I,
)

_EXCEPTION = re.compile(r"(?:\w+\.)*\w*(?:Error|Exception|Exceeded)\b(?::.*)?")

_LOCK = re.compile(r"Failed to create/acquire the lock .*")

_RELOCATED = re.compile(r"previously located at (\S+)")

_NOT_A_CAUSE = ("Warning: Permanently added", "Borg server:", "Connection closed by remote host")


@dataclass(frozen=True)
class Cause:
    """What a failed borg call ran into: a `kind` and the line of borg's or ssh's naming it."""

    kind: str  # stalled, host-key, ssh-key, no-space, relocated, rolled-back, locked, missing,
    # connection
    detail: str = ""
    remote: bool = False  # found on the server (its traceback), not on this host


# Causes that another attempt cannot cure.
NEVER_RETRIED = frozenset({"stalled", "host-key", "ssh-key"})


def _lines(result: BorgResult) -> list[str]:
    """Every line of every message, borg's "Remote: " prefix (ssh's forwarded lines) removed."""
    lines = []
    for message in result.messages:
        for line in str(message.get("message", "")).splitlines():
            line = line.strip().removeprefix("Remote: ").strip()
            if line:
                lines.append(line)
    return lines


def _first(pattern: re.Pattern[str], lines: Sequence[str]) -> str | None:
    return next((line for line in lines if pattern.search(line)), None)


def diagnose(result: BorgResult) -> Cause | None:
    """The cause of a failed call, from borg's messages, the server's traceback it forwards
    and ssh's own lines; None when none is recognised."""
    if result.stalled_after is not None:
        return Cause("stalled", f"no progress for {result.stalled_after:g} s")
    lines = _lines(result)
    if _first(_HOST_KEY, lines):
        return Cause("host-key", _first(_HOST_KEY_DETAIL, lines) or "Host key verification failed.")
    if denied := _first(_DENIED, lines):
        identity = _first(_NO_IDENTITY, lines)
        return Cause("ssh-key", f"{identity.rstrip('.')}; {denied}" if identity else denied)
    if _first(_NO_SPACE, lines):
        remote = any(
            line.startswith("Borg server:") or line.endswith(" in serve") for line in lines
        )
        exception = [line for line in lines if _NO_SPACE.search(line) and _EXCEPTION.match(line)]
        return Cause("no-space", (exception or [_first(_NO_SPACE, lines) or ""])[-1], remote)
    ids = {str(m.get("msgid", "")) for m in result.messages}
    if moved := _first(_RELOCATED, lines):
        return Cause("relocated", _RELOCATED.search(moved).group(1))  # type: ignore[union-attr]
    if "Cache.RepositoryReplay" in ids:
        return Cause("rolled-back", _first(re.compile("newer than repository"), lines) or "")
    if result.returncode == 73 or "LockTimeout" in ids:
        return Cause("locked", _first(_LOCK, lines) or "")
    if result.returncode == 13 or "Repository.DoesNotExist" in ids:
        return Cause("missing")
    if result.returncode in CONNECTION_FAILURES:
        said = [line for line in lines if not line.startswith(_NOT_A_CAUSE)]
        return Cause("connection", said[-1] if said else "connection closed")
    return None


def retryable(result: BorgResult) -> bool:
    """Whether a failed call may succeed when simply tried again: a connection failure,
    unless the host key or the ssh key was refused, or the call stalled."""
    if result.returncode not in CONNECTION_FAILURES:
        return False
    cause = diagnose(result)
    return cause is None or cause.kind not in NEVER_RETRIED


def _other_failure(command: str, repo: Repository, result: BorgResult) -> str:
    """The line for a failure with no recognised cause: borg's exception, else its last error."""
    lines = _lines(result)
    exceptions = [line for line in lines if _EXCEPTION.fullmatch(line)]
    errors = [
        problem.splitlines()[0]
        for problem in result.problems
        if problem and not problem.startswith(("Traceback", "Borg server:"))
    ]
    detail = (exceptions or errors or ["no message"])[-1]
    return f"borg {command} failed on repository {repo.name} (exit {result.returncode}): {detail}"


def explain_failure(command: str, repo: Repository, result: BorgResult) -> str:
    """One line naming what went wrong and how to fix it."""
    name, where = repo.name, f"{repo.name} ({repo.path})"
    cause = diagnose(result)
    kind, detail = (cause.kind, cause.detail.rstrip(".")) if cause else ("", "")
    lock_wait = repo.lock_wait if repo.lock_wait is not None else 1
    no_space_where = (
        "on the server of"
        if cause and cause.remote
        else "on this host (borg's cache, ~/.cache/borg) for"
        if is_remote(repo.path)
        else "on device for"
    )
    explained = {
        "stalled": f"repository {where} stalled: borg {command} showed {detail} and was "
        "stopped; check that the server, its disk and the network answer",
        "host-key": f"cannot reach repository {where}: the server's host key failed "
        f"verification ({detail}); not retried. If the server's key changed on purpose, "
        "check its fingerprint and replace its known_hosts entry (ssh-keygen -R HOST), else "
        "someone may be intercepting the connection",
        "ssh-key": f"cannot reach repository {where}: the server refused this host's ssh key "
        f"({detail}); not retried. Check the key given with -i in ssh_command and the "
        "server's authorized_keys",
        "no-space": f"no space left {no_space_where} repository {where} ({detail}): free "
        "space there (an append-only server frees the space of deleted runs only when its "
        "owner compacts)",
        "relocated": f"repository {name} is at {repo.path} but this host knew it at "
        f"{detail}: if it was moved on purpose, accept the move once with "
        f"BORG_RELOCATED_REPO_ACCESS_IS_OK=yes in the environment (e.g. "
        f"`BORG_RELOCATED_REPO_ACCESS_IS_OK=yes incus-borg list --repository {name}`), "
        "else fix its path",
        "rolled-back": f"repository {where} is older than this host last saw it ({detail}): "
        "if its owner rolled it back on purpose, clear this host's record of it (docs/offsite.md, "
        "Bringing deleted runs back), else find out who replaced it",
        "locked": f"repository {where} is locked by another process: borg waited "
        f"{lock_wait} s for its lock ({detail}); retry later, raise lock_wait, or run "
        f"`borg break-lock {repo.path}` if no borg is using it",
        "missing": f"repository {where} does not exist: run `incus-borg init`, or fix its path",
        "connection": f"cannot reach repository {where}: {detail}",
    }
    known = {
        15: f"{repo.path} is not a Borg repository: fix the path of repository {name}, "
        "or run `incus-borg init` for a new one",
        50: f"repository {name} is encrypted and no passphrase is configured: set "
        "encryption_passphrase or encryption_passcommand, or BORG_PASSPHRASE",
        51: f"the encryption_passcommand for repository {name} failed: check that it prints "
        "the passphrase",
        52: f"wrong passphrase for repository {name}: check encryption_passphrase, "
        "encryption_passcommand or BORG_PASSPHRASE",
    }
    if kind:
        return explained[kind]
    return known.get(result.returncode) or _other_failure(command, repo, result)


def raw_tail(result: BorgResult, limit: int = 30) -> list[str]:
    """The last `limit` lines of borg's and ssh's messages, as they came (for --debug)."""
    return [
        line
        for message in result.messages
        for line in str(message.get("message", "")).splitlines()
        if line.strip()
    ][-limit:]
