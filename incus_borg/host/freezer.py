"""A container frozen through the kernel's cgroup v1 freezer, as liblxc freezes it, without
liblxc's wait.

liblxc (under Incus's freeze) writes FROZEN to the container's `freezer.state`, then reads
it back, and while it reads FREEZING (some task not frozen yet) it sleeps a whole second
before it reads again: on a busy container most freezes last a second or more, though the
kernel is done within milliseconds. Here the state is read back every few milliseconds
instead, within a bound. liblxc knows nothing of such a freeze: Incus goes on reporting the
container as running, and its unfreeze does not thaw it, so whatever froze it thaws it
here (`thaw`). It is meant for moments (a snapshot group's snapshots), not for a read. On
cgroup v2 (where liblxc waits on the kernel's events, not by sleeping) and for anything
that is not a container's init, there is no such file: Incus freezes it.
"""

from __future__ import annotations

import time
from pathlib import Path, PurePosixPath

from ..errors import UserError

FREEZER = Path("/sys/fs/cgroup/freezer")  # the cgroup v1 freezer hierarchy
PAYLOAD = "lxc.payload"  # how liblxc names a container's cgroup
POLL = 0.002  # seconds between two reads of the state
RETRY = 0.05  # seconds between two writes of FROZEN (the kernel retries a stuck task then)
WAIT = 10.0  # seconds a freeze may take before it is given up (and the container thawed)


def state_file(pid: int, root: Path = FREEZER) -> Path | None:
    """The `freezer.state` of the container whose init is `pid` (its `lxc.payload.*`
    cgroup in the v1 freezer hierarchy), or None when there is none."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "freezer" not in controllers.split(","):
            continue
        parts = PurePosixPath(path).parts[1:]
        top = next((i for i, part in enumerate(parts) if part.startswith(PAYLOAD)), None)
        state = root.joinpath(*parts[: top + 1], "freezer.state") if top is not None else None
        return state if state is not None and state.is_file() else None
    return None


def freeze(state: Path, what: str, wait: float = WAIT) -> None:
    """Freeze the cgroup whose `freezer.state` is `state` and return once the kernel says
    it is FROZEN; refuse when that takes longer than `wait` (the caller thaws it)."""
    began = time.monotonic()
    written = 0.0
    try:
        while True:
            now = time.monotonic()
            if now - written >= RETRY:
                state.write_text("FROZEN")
                written = now
            if state.read_text().strip() == "FROZEN":
                return
            if now - began > wait:
                break
            time.sleep(POLL)
    except OSError as exc:
        raise UserError(f"{what} could not be frozen: {state}: {exc.strerror}") from None
    raise UserError(f"{what} did not freeze within {wait:.0f} s (a task does not stop)")


def thaw(state: Path, what: str, wait: float = WAIT) -> None:
    """Thaw a cgroup frozen by `freeze`; nothing to do when it is gone (the container
    stopped)."""
    began = time.monotonic()
    try:
        while True:
            state.write_text("THAWED")
            if state.read_text().strip() == "THAWED":
                return
            if time.monotonic() - began > wait:
                raise UserError(f"{what} did not thaw within {wait:.0f} s")
            time.sleep(POLL)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"{what} could not be thawed: {state}: {exc.strerror}") from None
