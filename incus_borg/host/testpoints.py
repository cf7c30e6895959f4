"""Test-only pause points: the tests reach a phase of a run by a mechanism, never by timing.

With `INCUS_BORG_TEST_PAUSE_AT=PHASE` (or `PHASE:TARGET`, such as `held:default/c1`) in its
environment, incus-borg stops itself with SIGSTOP the first time it reaches that phase (for
that target), with everything the phase holds still held; the test then sees the process
stopped, does what it came for (a kill, a signal, a change behind incus-borg's back) and
lets it go on with SIGCONT or kills it. Without the variable every point is inert. Every
phase is listed here, with where it lies.
"""

from __future__ import annotations

import os
import signal

ENV = "INCUS_BORG_TEST_PAUSE_AT"
PHASES = {
    "daemon-stopped": "backup, hook pre: the daemon is stopped, its database not yet copied",
    "captured": "backup: the server's state is in staging; no borg runs yet",
    "borg-started": "backup: every repository's borg create runs; nothing is quiesced yet",
    "held": "backup, hook pre, its gate keeper: an item (TARGET: P/NAME) is quiesced and "
    "mounted; a keeper's reader waits at the gate",
    "group-held": "backup, its gate keeper: a consistency group's (TARGET: its name) members "
    "are all frozen (or stopped), for its snapshots or its read",
    "export-requested": "backup: Incus makes an item's (TARGET: P/NAME) backup, journalled",
    "export-streaming": "backup: part of an item's (TARGET: P/NAME) export is in its borgs",
    "undone": "every release: one journalled step (TARGET: its op) was undone",
    "restore-extracting": "restore instance: made under its temporary name, its borgs extract",
    "restore-streaming": "restore instance --stream: borg export-tar runs, incus import not yet",
    "server-extracting": "restore server: the original moved aside, nothing extracted yet",
    "server-pools": "restore server: a pool prepared, an item (TARGET: P/NAME) not put back",
    "drill-restored": "check --drill: the run restored into the scratch Incus, not compared",
}
_paused: set[str] = set()


def reached(phase: str, target: str = "") -> None:
    """Stop here (SIGSTOP) when the environment asks for this phase (and target), once."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    if phase not in PHASES:
        raise ValueError(f"unknown pause point {phase!r}: add it to PHASES")
    name, _, only = wanted.partition(":")
    if name != phase or (only and only != target) or wanted in _paused:
        return
    _paused.add(wanted)
    os.kill(os.getpid(), signal.SIGSTOP)
