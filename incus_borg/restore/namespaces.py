"""Run a command in network and mount namespaces of its own, with a `/sys` that shows that
network namespace (run as `unshare --net --mount --propagation unchanged -- python -m
incus_borg.restore.namespaces COMMAND...`).

Incus checks an interface by `/sys/class/net/<name>`, and a sysfs shows the interfaces of the
network namespace that mounted it. So, in the new mount namespace, `/sys` stops propagating,
a fresh sysfs is mounted over it, and what was mounted on the old one (cgroups, security
file systems, ...) is bound back from descriptors opened before. A container can then mount a
sysfs of its own: the fresh one is fully visible (its submounts sit on empty directories).
`lo` is brought up (creating a network fails without it). Nothing else changes: what the
command mounts elsewhere propagates as the host's mounts do.
"""

from __future__ import annotations

import os
import subprocess
import sys

from ..host import mounts


def submounts(top: str) -> list[str]:
    """The mount points directly on the topmost mount at `top`, in mount order."""
    rows = mounts.mountinfo()
    ids = [row[0] for row in rows if mounts.unescape(row[4]) == top]
    if not ids:
        return []
    return [mounts.unescape(row[4]) for row in rows if row[1] == ids[-1]]


def _run(*argv: str, fds: tuple[int, ...] = ()) -> None:
    subprocess.run(argv, check=True, pass_fds=fds, timeout=60)


def main(command: list[str]) -> None:
    """Give this mount namespace a `/sys` of this network namespace, bring `lo` up, and
    become `command`."""
    below = submounts("/sys")
    _run("mount", "--make-rslave", "/sys")
    kept = [os.open(point, os.O_PATH | os.O_DIRECTORY) for point in below]
    _run("mount", "-t", "sysfs", "sysfs", "/sys")
    for point, fd in zip(below, kept, strict=True):
        _run("mount", "--no-canonicalize", "--rbind", f"/proc/self/fd/{fd}", point, fds=(fd,))
        os.close(fd)
    _run("ip", "link", "set", "lo", "up")
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
