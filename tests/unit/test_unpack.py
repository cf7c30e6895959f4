"""Cutting an extraction into parallel jobs: balance, hard links, flags, placeholders, checks.

The end-to-end proof (real borg, real incusd) is in test_restore.py; these cover the
planner's edge cases on hand-made listings.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from incus_borg.errors import UserError
from incus_borg.restore import unpack
from incus_borg.restore.unpack import Entry, Tree

MB = 1_000_000
ROOT = "instances/default/c1/backup/container"


def listing(files: dict[str, int], links: dict[str, str] | None = None) -> list[Entry]:
    """Entries for files (path below ROOT -> size), with every directory above them."""
    entries: dict[str, Entry] = {}
    for rel, size in files.items():
        parts = rel.split("/")
        for i in range(1, len(parts)):
            d = f"{ROOT}/{'/'.join(parts[:i])}"
            entries.setdefault(d, Entry(d, "d", 0))
        entries[f"{ROOT}/{rel}"] = Entry(f"{ROOT}/{rel}", "-", size)
    for rel, target in (links or {}).items():
        entries[f"{ROOT}/{rel}"] = Entry(f"{ROOT}/{rel}", "-", 0, f"{ROOT}/{target}")
    return list(entries.values())


def test_one_worker_or_a_small_tree_is_one_job(tmp_path: Path) -> None:
    entries = listing({"rootfs/usr/a": 300 * MB, "rootfs/srv/b": 300 * MB})
    assert len(unpack.split([Tree(ROOT, tmp_path)], entries, 1).jobs) == 1
    small = listing({"rootfs/usr/a": 10 * MB, "rootfs/srv/b": 10 * MB})
    assert len(unpack.split([Tree(ROOT, tmp_path)], small, 2).jobs) == 1


def test_a_large_tree_is_cut_about_in_half(tmp_path: Path) -> None:
    files = {f"rootfs/usr/lib/d{i}/f": 40 * MB for i in range(10)}
    files |= {f"rootfs/srv/f{i}": 50 * MB for i in range(4)}
    extractions = unpack.split([Tree(ROOT, tmp_path)], listing(files), 2)
    cut, rest = extractions.jobs if extractions.jobs[0].paths != (ROOT,) else extractions.jobs[::-1]
    assert rest.paths == (ROOT,)
    assert set(cut.paths) <= set(rest.excludes)
    assert 0.8 < cut.cost / rest.cost < 1.25
    assert all(p.startswith(ROOT + "/rootfs/") for p in cut.paths)


def test_hard_links_never_cross_a_cut(tmp_path: Path) -> None:
    files = {f"rootfs/a/f{i}": 100 * MB for i in range(3)}
    files |= {f"rootfs/b/f{i}": 100 * MB for i in range(3)}
    entries = listing(files, links={"rootfs/b/link": "rootfs/a/f0"})
    extractions = unpack.split([Tree(ROOT, tmp_path)], entries, 2)
    for job in extractions.jobs:
        for path in job.paths:
            assert path not in (f"{ROOT}/rootfs/a", f"{ROOT}/rootfs/b")
    linked = {f"{ROOT}/rootfs/b/link", f"{ROOT}/rootfs/a/f0"}
    cut_paths = [p for j in extractions.jobs if j.paths != (ROOT,) for p in j.paths]
    assert not any(any(x.startswith(p + "/") or x == p for x in linked) for p in cut_paths)


def test_no_cut_inside_a_directory_with_flags(tmp_path: Path) -> None:
    files = {f"rootfs/locked/f{i}": 100 * MB for i in range(6)}
    entries = [
        Entry(e.path, e.type, e.size, flags=0x10) if e.path.endswith("/locked") else e
        for e in listing(files)
    ]
    extractions = unpack.split([Tree(ROOT, tmp_path)], entries, 2)
    assert [j.paths for j in extractions.jobs] == [(ROOT,)]


def test_snapshots_are_jobs_of_their_own(tmp_path: Path) -> None:
    snap = "instances/default/c1/backup/snapshots/s1"
    entries = [
        *listing({"rootfs/a": 100 * MB}),
        Entry(f"{snap}/rootfs", "d", 0),
        Entry(f"{snap}/rootfs/a", "-", 100 * MB),
    ]
    trees = [Tree(ROOT, tmp_path / "main"), Tree(snap, tmp_path / "snap")]
    extractions = unpack.split(trees, entries, 2)
    assert sorted(j.dest.name for j in extractions.jobs) == ["main", "snap"]
    assert {j.strip for j in extractions.jobs} == {5, 6}


def test_placeholders_keep_directories_and_their_times(tmp_path: Path) -> None:
    files = {f"rootfs/usr/lib/d{i}/f": 40 * MB for i in range(10)}
    files |= {f"rootfs/srv/f{i}": 50 * MB for i in range(4)}
    extractions = unpack.split([Tree(ROOT, tmp_path)], listing(files), 2)
    assert extractions.placeholders
    extractions.prepare()
    for placeholder in extractions.placeholders:
        assert placeholder.is_file()
        os.utime(placeholder.parent, ns=(1, 7_000_000_123))  # as an extraction sets it
    extractions.finish()
    for placeholder in extractions.placeholders:
        assert not placeholder.exists()
        assert placeholder.parent.stat().st_mtime_ns == 7_000_000_123


def test_verify_names_what_is_missing_or_different(tmp_path: Path) -> None:
    entries = listing({"rootfs/a": 3, "rootfs/b": 2}, links={"rootfs/c": "rootfs/a"})
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "rootfs" / "a").write_text("abc")
    (tmp_path / "rootfs" / "b").write_text("xy")
    os.link(tmp_path / "rootfs" / "a", tmp_path / "rootfs" / "c")
    assert unpack.verify([Tree(ROOT, tmp_path)], entries) == 4
    (tmp_path / "rootfs" / "b").write_text("xyz")
    with pytest.raises(UserError, match="rootfs/b does not match the archive"):
        unpack.verify([Tree(ROOT, tmp_path)], entries)
    (tmp_path / "rootfs" / "b").unlink()
    with pytest.raises(UserError, match="rootfs/b is missing"):
        unpack.verify([Tree(ROOT, tmp_path)], entries)


def test_listing_of_a_directory_matches_borgs_shape(tmp_path: Path) -> None:
    top = tmp_path / "instances" / "p" / "n" / "backup"
    (top / "container" / "rootfs").mkdir(parents=True)
    (top / "container" / "rootfs" / "f").write_bytes(b"12345")
    os.link(top / "container" / "rootfs" / "f", top / "container" / "rootfs" / "g")
    (top / "container" / "rootfs" / "l").symlink_to("f")
    entries = {e.path: e for e in unpack.walk_listing(tmp_path, "instances/p/n/backup")}
    base = "instances/p/n/backup/container/rootfs"
    assert entries[base].type == "d"
    assert (entries[f"{base}/f"].type, entries[f"{base}/f"].size) == ("-", 5)
    assert entries[f"{base}/g"].source == f"{base}/f"
    assert entries[f"{base}/l"].type == "l"
