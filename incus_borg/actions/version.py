"""`incus-borg --version`: this incus-borg, the borg it runs, and the Incus it talks to.

Every line is best effort: a missing borg or an unreachable Incus is said, never an error,
so that the output can go into a bug report from a broken host.
"""

from __future__ import annotations

from .. import __version__, config
from ..borg import checked_version, find_borg
from ..errors import UserError
from ..incus import Incus

INCUS_TIMEOUT = 5.0  # seconds: a daemon that does not answer by then is "unreachable"


def report(config_file: str | None) -> str:
    """The three lines: incus-borg's version, borg's, and the Incus server's."""
    return "\n".join((f"incus-borg {__version__}", borg_line(), incus_line(config_file)))


def borg_line() -> str:
    """The borg incus-borg would run and its version, or why there is none."""
    try:
        binary = find_borg()
    except UserError as exc:
        return f"borg missing: {exc}"
    try:
        return f"borg {checked_version(binary)} ({binary})"
    except UserError as exc:
        return f"borg unusable: {exc}"


def incus_line(config_file: str | None) -> str:
    """The configured Incus server's version, or why it cannot be told."""
    try:
        loaded, _ = config.load(config_file)
    except UserError as exc:
        return f"incus unknown: {exc}"
    server = Incus(loaded.incus.dir, timeout=INCUS_TIMEOUT)
    try:
        return f"incus {server.version()} ({server.dir})"
    except UserError as exc:
        return f"incus unreachable: {exc}"
