"""Which processes a drill's teardown takes for its scratch daemon's: only those naming the
scratch directory and their descendants; never by network namespace, never this process's
ancestors, never for a directory that is not a scratch directory.

No root and no Incus: plain child processes.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.incusd import children as harness_children

from incus_borg.errors import UserError
from incus_borg.restore.scratch import PREFIX, Scratch


@pytest.fixture
def scratch(tmp_path: Path) -> Scratch:
    root = tmp_path / f"{PREFIX}unit"
    root.mkdir()
    return Scratch(root)


@pytest.fixture
def children(scratch: Scratch) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """A process naming the directory (with a child of its own), one working in it, and one
    that has nothing to do with it (in the same network namespace)."""
    started = {
        "names": subprocess.Popen(["sh", "-c", "sleep 60 & wait", str(scratch.root / "incus")]),
        "inside": subprocess.Popen(["sleep", "60"], cwd=scratch.root),
        "other": subprocess.Popen(["sleep", "61"]),
    }
    deadline = time.monotonic() + 30
    while not harness_children(started["names"].pid):  # until the shell has started its `sleep`
        assert time.monotonic() < deadline, "the shell started no child"
        time.sleep(0.01)
    yield started
    for proc in started.values():
        proc.kill()
        proc.wait()


def test_only_what_names_the_directory_and_its_descendants(
    scratch: Scratch, children: dict[str, subprocess.Popen[bytes]]
) -> None:
    scratch.netns = os.stat("/proc/self/ns/net").st_ino  # the host's: never a reason
    found = set(scratch.processes())
    assert children["names"].pid in found
    assert children["inside"].pid in found
    assert children["other"].pid not in found
    descendants = set(harness_children(children["names"].pid))
    assert descendants and descendants <= found  # the `sleep` its shell started
    assert os.getpid() not in found and os.getppid() not in found


def test_a_directory_that_is_not_a_scratch_directory_is_refused(tmp_path: Path) -> None:
    for root in (Path("/"), tmp_path, Path(f"relative/{PREFIX}x")):
        with pytest.raises(UserError, match="is not a scratch directory"):
            Scratch(root)
