"""A gate in front of staging directories: the kernel holds a process's open() of a marked
directory (or file) until the gate answers (fanotify permission events).

Borg reads its path arguments one after the other, so when it opens one item's directory it
has finished every item before it: that is the moment to release the previous item and
quiesce this one. Only staging directories that incus-borg itself owns are marked, so no
instance's own process ever waits. If incus-borg dies, the kernel closes the gate's
descriptor and lets every pending open through.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_CONTENT = 0x4
FAN_MARK_ADD = 0x1
FAN_CLOSE_NOWRITE = 0x10
FAN_OPEN_PERM = 0x10000
FAN_ONDIR = 0x40000000
FAN_ALLOW = 0x1
AT_FDCWD = -100
_EVENT = struct.Struct("IBBHQii")  # struct fanotify_event_metadata
_RESPONSE = struct.Struct("iI")  # struct fanotify_response

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]


@dataclass(frozen=True)
class Opening:
    """A process waiting to open a marked path (or, with `closed`, one that closed it: no
    answer is due, `drop` it)."""

    fd: int  # the event's descriptor: answer with it, then it is closed
    pid: int
    path: str
    closed: bool = False


class Gate:
    """One fanotify group holding opens of marked paths until they are allowed."""

    def __init__(self) -> None:
        flags = FAN_CLASS_CONTENT | FAN_CLOEXEC | FAN_NONBLOCK
        fd = _libc.fanotify_init(flags, os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC)
        if fd < 0:
            errno = ctypes.get_errno()
            raise UserError(
                "this kernel gives no fanotify permission events "
                f"({os.strerror(errno)}; CONFIG_FANOTIFY_ACCESS_PERMISSIONS), which freeze and "
                "stop modes need to quiesce one instance at a time: run as root on a kernel "
                "that has them, or use mode snapshot or none, or hook mode"
            )
        self.fd = fd

    def mark(self, path: Path, closes: bool = False) -> None:
        """Hold every open of `path` (a directory or a file) until it is allowed; with
        `closes`, also report each last close of it (a directory that Borg walked is closed
        once Borg has read everything below it)."""
        mask = FAN_OPEN_PERM | FAN_ONDIR | (FAN_CLOSE_NOWRITE if closes else 0)
        if _libc.fanotify_mark(self.fd, FAN_MARK_ADD, mask, AT_FDCWD, os.fsencode(path)) != 0:
            errno = ctypes.get_errno()
            raise UserError(f"cannot watch {path}: {os.strerror(errno)}")

    def wait(self, timeout: float) -> list[Opening]:
        """The opens waiting now, after at most `timeout` seconds."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        try:
            buf = os.read(self.fd, 64 * _EVENT.size)
        except BlockingIOError:
            return []
        openings = []
        for offset in range(0, len(buf), _EVENT.size):
            length, _, _, _, mask, fd, pid = _EVENT.unpack_from(buf, offset)
            if length != _EVENT.size or fd < 0:
                continue
            path = os.readlink(f"/proc/self/fd/{fd}")
            openings.append(Opening(fd, pid, path, closed=not mask & FAN_OPEN_PERM))
        return openings

    def allow(self, opening: Opening) -> None:
        """Let a waiting open through (nothing to do when its process was killed since)."""
        try:
            os.write(self.fd, _RESPONSE.pack(opening.fd, FAN_ALLOW))
        except FileNotFoundError:  # the kernel holds no such event any more
            pass
        finally:
            os.close(opening.fd)

    def drop(self, opening: Opening) -> None:
        """Forget an event that needs no answer: a close, or the open of a process that was
        killed while it waited."""
        os.close(opening.fd)

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop gating: the kernel lets every pending and later open through."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
