"""Read-only bind mounts at stable paths, so that Borg's files cache sees the same paths."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .errors import UserError

TIMEOUT = 60


def is_mounted(path: Path) -> bool:
    """Whether something is mounted exactly at `path`."""
    target = str(path.resolve()) if path.exists() else str(path)
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == target for line in f)


def mounts_below(root: Path) -> list[Path]:
    """Every mount point at or below `root`, deepest first."""
    prefix = str(root.resolve()) if root.exists() else str(root)
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    found = [Path(p) for p in points if p == prefix or p.startswith(prefix + "/")]
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape")


def bind_readonly(source: Path, target: Path) -> None:
    """Bind-mount `source` (a directory or a file) read-only at `target`."""
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
    else:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        target.touch(mode=0o600, exist_ok=True)
    _run(["mount", "--bind", "-o", "ro", str(source), str(target)])
    # A bind mount ignores "ro" on older util-linux: make sure it is read-only.
    _run(["mount", "-o", "remount,bind,ro", str(target)])


def unmount(target: Path) -> None:
    """Unmount `target` if something is mounted there."""
    while is_mounted(target):
        _run(["umount", str(target)])


def _run(argv: list[str]) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"`{' '.join(argv)}` did not finish within {TIMEOUT} s") from None
    if done.returncode != 0:
        raise UserError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.returncode}")
