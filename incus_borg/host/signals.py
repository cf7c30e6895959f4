"""SIGTERM and SIGHUP interrupt a run like Ctrl-C, so that every quiesce is undone."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


@contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt for the duration."""
    previous = {s: signal.signal(s, _interrupt) for s in CAUGHT}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold back an interrupting signal until the block ends, then deliver it to whatever
    handled it before, so that a step such as starting a child and recording it is never cut
    in half. (Outside the main thread, where no handler runs, nothing is held back.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _: caught.append(signum)) for s in CAUGHT}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])


@contextmanager
def shielded() -> Iterator[None]:
    """Ignore interrupting signals while undoing, so that the undo itself completes."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in CAUGHT}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
