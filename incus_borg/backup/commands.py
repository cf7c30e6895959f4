"""The `pre` and `post` commands of an instance's policy, run inside the instance.

Each runs through the Incus API as `incus exec` does (as root, with the instance's
`environment.*` keys), as `sh -c COMMAND` without input; its stdout is discarded and its
stderr kept for the report. Each is bounded by the policy's timeout.

Ending the wait for a command does not end its processes inside the instance, and they are
in no process group or session that the instance could signal (Incus starts them from
outside its PID namespace). So every process a command starts carries a token in its
environment (`INCUS_BORG_TOKEN`), inherited by its children and by daemons it starts
(`&`, setsid). To end a command, a second command inside the instance kills every process
whose environment holds the token, round after round until none is left. It needs `sh`,
`grep -z` (GNU grep, busybox) and `/proc` in the instance; a process that drops its
environment (`env -i`, `su -`) or that the instance's init system starts is not found.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..incus import Incus

TOKEN = "INCUS_BORG_TOKEN"
KILL_TIMEOUT = 30  # seconds the kill, and the end of the killed command, may take
STDERR_LINES = 3  # last lines of stderr quoted when a command fails
NO_GREP, LEFT = 3, 1  # exit codes of KILL_SCRIPT

# $1: the token. Exits 0 once no process holds it, 3 without `grep -z`, 1 after 100 rounds.
KILL_SCRIPT = """
printf 'a\\0' | grep -qzxF a || exit 3
t="INCUS_BORG_TOKEN=$1"
n=0
while found=$(grep -lsxzF -- "$t" /proc/[0-9]*/environ); [ -n "$found" ]; do
    for f in $found; do f=${f#/proc/}; kill -KILL "${f%/environ}" 2>/dev/null; done
    n=$((n + 1))
    [ "$n" -lt 100 ] || exit 1
    sleep 0.1
done
"""

Say = Callable[[str], None]


@dataclass
class Outcome:
    """What one command did."""

    exit_code: int | None  # None: it timed out, or could not be run
    duration: float
    stderr: str = ""
    problem: str | None = None  # what went wrong, in words; None when it exited 0

    @property
    def ok(self) -> bool:
        """Whether it exited 0."""
        return self.problem is None

    def failure(self) -> str:
        """Its problem and the last lines of its stderr, in one line."""
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        tail = " / ".join(lines[-STDERR_LINES:])
        return f"{self.problem}: {tail}" if tail else str(self.problem)


def new_token() -> str:
    """A token marking the processes of one instance's commands in one run."""
    return secrets.token_hex(8)


def run(incus: Incus, project: str, name: str, command: str, timeout: int, token: str) -> Outcome:
    """Run `command` inside the instance; past `timeout` seconds every process it started
    is killed inside the instance."""
    started = time.monotonic()
    try:
        operation = incus.exec_start(
            project, name, ["sh", "-c", "exec >/dev/null\n" + command], {TOKEN: token}
        )
        done = incus.exec_wait(project, name, operation, timeout)
    except UserError as exc:
        return Outcome(None, time.monotonic() - started, problem=f"could not be run ({exc})")
    if done is None:
        left = end(incus, project, name, token)
        try:
            done = incus.exec_wait(project, name, operation, KILL_TIMEOUT)
        except UserError:
            done = None
        killed = f"timed out after {timeout} s (user.incus-borg.timeout) and was killed"
        if left:
            killed += f", but {left}"
        return Outcome(None, time.monotonic() - started, done[1] if done else "", killed)
    code, stderr = done
    problem = None if code == 0 else f"exited {code}"
    return Outcome(code, time.monotonic() - started, stderr, problem)


def end(incus: Incus, project: str, name: str, token: str) -> str | None:
    """Kill every process inside the instance that carries `token`; None when none is left,
    else why some may be."""
    try:
        operation = incus.exec_start(project, name, ["sh", "-c", KILL_SCRIPT, "sh", token], {})
        done = incus.exec_wait(project, name, operation, KILL_TIMEOUT)
    except UserError as exc:
        return f"its processes could not be ended ({exc})"
    if done is None:
        return f"ending its processes took longer than {KILL_TIMEOUT} s"
    if done[0] == NO_GREP:
        return "its processes could not be found: the instance has no `grep -z`"
    if done[0] != 0:
        return "some of its processes are still running"
    return None


def finish(incus: Incus, step: dict[str, Any], report: Say, warn: Say) -> Outcome | None:
    """What ends an instance's commands (the undo of the step journalled before its `pre`):
    kill what is left of them, then run its `post` once. The outcome of `post`, or None when
    there is none or it could not run. Raises only when Incus does not answer (the step then
    stays journalled for the next run)."""
    project, name = step["project"], step["name"]
    ref = f"{project}/{name}"
    try:
        status = incus.instance_status(project, name)
    except UserError:
        if not incus.reachable():
            raise
        warn(f"instance {ref} is gone: its post command was not run")
        return None
    if status != "Running":
        warn(f"instance {ref} is {status.lower()}: its post command was not run")
        return None
    left = end(incus, project, name, step["token"])
    if left:
        warn(f"instance {ref}: what its pre command left behind: {left}")
    if not step.get("post"):
        return None
    outcome = run(incus, project, name, step["post"], step["timeout"], step["token"])
    if outcome.ok:
        report(f"instance {ref}: post command ran in {outcome.duration:.1f} s")
    else:
        warn(f"instance {ref}: its post command {outcome.failure()}")
    return outcome
