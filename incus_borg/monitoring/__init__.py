"""Knowing that everything is backed up: how each command ended (watch), what each run holds
(index, so that status needs no borg), each instance's state (coverage), the Prometheus
textfile (metrics), notifications (notify) and the report (page)."""

from .watch import (
    forget,
    hook_run,
    index_file,
    record_backup,
    record_hook_run,
    standings,
    this_member,
    watched,
)

__all__ = [
    "forget",
    "hook_run",
    "index_file",
    "record_backup",
    "record_hook_run",
    "standings",
    "this_member",
    "watched",
]
