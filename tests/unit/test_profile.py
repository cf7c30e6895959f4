"""The profile: each phase below the one it ran in, with its wall and CPU time."""

from __future__ import annotations

import subprocess
import threading
import time

from incus_borg.profile import Profile


def test_phases_nest_and_add_up_over_calls() -> None:
    profile = Profile()
    for _ in range(2):
        with profile.phase("read"), profile.phase("quiesce"):
            time.sleep(0.01)
        with profile.phase("index"), profile.phase("quiesce"):
            pass
    figures = profile.as_dict()
    assert list(figures) == ["read", "read/quiesce", "index", "index/quiesce"]
    assert figures["read"]["calls"] == 2 and figures["read/quiesce"]["calls"] == 2
    assert figures["read"]["wall"] >= figures["read/quiesce"]["wall"] >= 0.02
    lines = profile.table().splitlines()
    assert [line.split()[0] for line in lines[2:]] == [
        "read",
        "quiesce",
        "index",
        "quiesce",
        "total",
    ]
    assert lines[3].startswith("  quiesce")


def test_a_phase_in_another_thread_starts_at_the_top() -> None:
    profile = Profile()

    def snapshots() -> None:
        with profile.phase("snapshots"):
            pass

    with profile.phase("read"):
        worker = threading.Thread(target=snapshots)
        worker.start()
        worker.join()
    assert list(profile.as_dict()) == ["read", "snapshots"]


def test_the_cpu_of_a_program_waited_for_counts_as_its_phase() -> None:
    profile = Profile()
    with profile.phase("borg"):
        subprocess.run(
            ["sh", "-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"], check=True
        )
    figures = profile.as_dict()["borg"]
    assert figures["children_cpu"] > 0.05
    assert figures["cpu"] < figures["children_cpu"]


def test_work_carried_to_another_thread_counts_below_the_phase_it_came_from() -> None:
    profile = Profile()

    def release() -> None:
        with profile.phase("release"):
            pass

    with profile.phase("read"):
        worker = threading.Thread(target=profile.carried(release))
        worker.start()
        worker.join()
    assert list(profile.as_dict()) == ["read", "read/release"]
