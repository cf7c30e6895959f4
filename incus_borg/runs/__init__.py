"""A repository's runs: which archives make a run and its state (archives), and which runs
`prune` keeps (retention)."""

from .archives import (
    COMPLETE,
    EVERY,
    INCOMPLETE,
    PARTIAL,
    UNKNOWN,
    Archive,
    Run,
    Scope,
    candidates,
    find,
    given_comment,
    group,
    members,
    newest_complete,
    read_manifests,
    resolve,
)

__all__ = [
    "COMPLETE",
    "EVERY",
    "INCOMPLETE",
    "PARTIAL",
    "UNKNOWN",
    "Archive",
    "Run",
    "Scope",
    "candidates",
    "find",
    "given_comment",
    "group",
    "members",
    "newest_complete",
    "read_manifests",
    "resolve",
]
