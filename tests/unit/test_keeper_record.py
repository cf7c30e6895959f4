"""What `hook post` says from a gate keeper's record, and the Incus directory as hook mode
lays it out, without a server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

from incus_borg.backup.keeper import Record, is_borg, report
from incus_borg.layout import incus_view

ITEMS = [{"ref": f"default/c{i}", "kind": "instance", "mode": "freeze"} for i in range(3)]


def window(ref: str, pid: int, note: str = "") -> dict[str, Any]:
    fields = {"ref": ref, "kind": "instance", "mode": "freeze", "pids": [pid], "note": note}
    return fields | {"length": 0.3, "read": 0.28, "quiesce": 0.01, "release": 0.01}


def said(tmp_path: Path, lines: list[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[str]]:
    record = Record(tmp_path / "staging.keeper")
    record.clear()
    record.write("start", pid=1, items=ITEMS, lifetime=60)
    for entry, fields in lines:
        record.write(entry, **fields)
    lines_said: list[str] = []
    warned: list[str] = []
    report(record, lines_said.append, warned.append)
    return lines_said, warned


def a_pass(pid: int) -> list[tuple[str, dict[str, Any]]]:
    lines: list[tuple[str, dict[str, Any]]] = []
    for item in ITEMS:
        lines += [("enter", {"ref": item["ref"], "kind": "instance", "pid": pid})]
        lines += [("window", window(item["ref"], pid))]
    return lines


ASK: tuple[str, dict[str, Any]] = ("ask", {})
ASKED = ("end", {"why": "asked to end", "asked": True})


def test_a_clean_run_says_each_window(tmp_path: Path) -> None:
    lines, warned = said(tmp_path, [*a_pass(10), ASK, ASKED])
    assert not warned
    assert lines[0] == (
        "instance default/c0: frozen 1 time(s) while Borg read it: "
        "0.30 s (Incus 0.01 s to quiesce, Borg 0.28 s to read)"
    )


def test_a_reader_that_is_not_borg_is_said(tmp_path: Path) -> None:
    lines, warned = said(tmp_path, [("other", {"pid": 7, "program": "restic"}), ASK, ASKED])
    assert not warned
    assert lines[0].startswith("restic (pid 7) is not Borg")


def test_keeper_killed_in_a_pass_names_what_that_pass_read_live(tmp_path: Path) -> None:
    lines = [*a_pass(10)[:2], ("enter", {"ref": "default/c1", "kind": "instance", "pid": 10})]
    _, warned = said(tmp_path, lines)
    assert len(warned) == 1
    assert "killed: Borg may have read default/c2 without a quiesce" in warned[0]
    assert "default/c1 stayed quiesced until `hook post`" in warned[0]


def test_keeper_killed_between_passes_names_every_instance(tmp_path: Path) -> None:
    _, warned = said(tmp_path, a_pass(10))
    assert "default/c0, default/c1, default/c2 without a quiesce" in warned[0]


def test_keeper_killed_before_any_borg_names_every_instance(tmp_path: Path) -> None:
    _, warned = said(tmp_path, [])
    assert "default/c0, default/c1, default/c2 without a quiesce" in warned[0]


def test_keeper_that_ended_by_itself_or_gave_up_a_window_warns(tmp_path: Path) -> None:
    too_long = window("default/c0", 10, note="released after max_window (120 s) ...")
    failed = {"ref": "default/c1", "kind": "instance", "pid": 10, "why": "cannot freeze"}
    end = ("end", {"why": "it reached its lifetime (3 s)", "asked": False})
    _, warned = said(tmp_path, [("window", too_long), ("failed", failed), end])
    assert warned == [
        "instance default/c0: released after max_window (120 s) ...",
        "instance default/c1 read without a quiesce: cannot freeze",
        "the gate keeper ended by itself: it reached its lifetime (3 s); whatever Borg read "
        "after that was not quiesced, so this run is not consistent",
    ]


def test_no_record_says_nothing(tmp_path: Path) -> None:
    assert report(Record(tmp_path / "none"), print, print) == {}


def test_borg_is_told_from_other_readers() -> None:
    assert is_borg(["/usr/bin/python3", "/usr/bin/borg", "create"])
    assert is_borg(["borg", "create", "--dry-run"])
    assert not is_borg(["/usr/bin/restic", "backup"])
    assert not is_borg([])


def test_incus_view_leaves_out_what_backup_excludes(tmp_path: Path) -> None:
    incus = tmp_path / "incus"
    for sub in ("logs/c1", "backups/b1", "storage-pools/default/containers/c1/rootfs"):
        (incus / sub).mkdir(parents=True)
    (incus / "server.crt").write_text("crt")
    (incus / "unix.socket").write_text("")
    (incus / "storage-pools/default/containers/c1/backup.yaml").write_text("")
    os.symlink("storage-pools", incus / "pools")
    os.chmod(incus / "storage-pools/default/containers", 0o711)
    view = incus_view(incus)
    made = [str(path) for path, _ in view.made]
    assert made == [
        "incus",
        "incus/backups",
        "incus/storage-pools",
        "incus/storage-pools/default",
        "incus/storage-pools/default/containers",
    ]
    assert view.bound == {PurePosixPath("incus/server.crt"): incus / "server.crt"}
    assert view.links == {PurePosixPath("incus/pools"): "storage-pools"}


def test_the_starter_is_found_past_shells_and_wrappers() -> None:
    """`sudo`, `timeout` or `flock` before `hook pre` fork and wait: they end with it, so
    the keeper must watch the process that ran them, not them."""
    probe = "from incus_borg.backup.keeper import starter; print(starter()[0])"
    argv = ["timeout", "60", "flock", "/", "sh", "-c", f"{sys.executable} -c '{probe}'; true"]
    found = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert int(found.stdout) == os.getpid()


def test_a_record_made_again_is_roots_only_and_odd_lines_are_skipped(tmp_path: Path) -> None:
    record = Record(tmp_path / "staging.keeper")
    umask = os.umask(0o022)
    try:
        record.write("start", pid=1, items=ITEMS, lifetime=60)
    finally:
        os.umask(umask)
    with (tmp_path / "staging.keeper").open("a") as f:
        f.write('["not", "a", "record"]\n7\n{"a": 1, "b": 2}\n{"torn": \n')
    assert (tmp_path / "staging.keeper").stat().st_mode & 0o777 == 0o600
    assert [kind for kind, _ in record.read()] == ["start"]


def test_an_instance_not_released_is_said_so_not_as_read_live(tmp_path: Path) -> None:
    stuck = window("default/c1", 10) | {"why": "cannot unfreeze c1"}
    lines = [*a_pass(10)[:3], ("stuck", stuck), *a_pass(10)[4:], ASK, ASKED]
    _, warned = said(tmp_path, lines)
    assert warned == [
        "instance default/c1 stayed quiesced after Borg read it, until `hook post` undid it: "
        "could not release it: cannot unfreeze c1"
    ]


def test_a_signal_not_from_hook_post_counts_as_ending_by_itself(tmp_path: Path) -> None:
    """Anyone's SIGTERM ends the keeper; only `hook post`'s (its `ask` line before) is
    asked: after any other, Borg may read the rest live."""
    _, warned = said(tmp_path, [*a_pass(10)[:2], ASKED, ASK])
    assert len(warned) == 1
    assert "ended by itself: a signal not from `hook post`" in warned[0], warned
