"""Work done side by side in threads, each thread's time counted in the phase that started it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from .. import profile

T = TypeVar("T")
R = TypeVar("R")


def side_by_side(work: Callable[[T], R], args: Sequence[T]) -> list[R | BaseException]:
    """`work` on each of `args` in its own thread (the phase's profile carried); each
    result, or what it raised, in order."""
    if len(args) < 2:
        return [_outcome(work, a) for a in args]

    def one(arg: T) -> R | BaseException:
        return _outcome(work, arg)

    with ThreadPoolExecutor(len(args), thread_name_prefix="incus-borg-group") as pool:
        return list(pool.map(profile.carried(one), args))


def _outcome(work: Callable[[T], R], arg: T) -> R | BaseException:
    try:
        return work(arg)
    except BaseException as exc:
        return exc
