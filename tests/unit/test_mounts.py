"""Mount points are read from /proc/self/mountinfo exactly: octal escapes decoded, and bytes
that are not UTF-8 kept as the file system encoding keeps them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from incus_borg.errors import UserError
from incus_borg.host import mounts


@pytest.mark.parametrize(
    ("field", "path"),
    [
        (rb"/tmp/plain", "/tmp/plain"),
        (rb"/tmp/with\040space", "/tmp/with space"),
        (rb"/tmp/tab\011and\012newline", "/tmp/tab\tand\nnewline"),
        (rb"/tmp/back\134slash", "/tmp/back\\slash"),
        ("/tmp/stagé".encode(), "/tmp/stagé"),
        (b"/tmp/not-utf8-\xff", os.fsdecode(b"/tmp/not-utf8-\xff")),
    ],
)
def test_mountinfo_paths_are_decoded_exactly(field: bytes, path: str) -> None:
    assert mounts.unescape(field) == path
    assert Path(mounts.unescape(field)) == Path(os.fsdecode(os.fsencode(path)))


def test_mounts_below_match_whole_components(monkeypatch: pytest.MonkeyPatch) -> None:
    points = ["/s/stagé", "/s/stagé/incus", "/s/stagé-other", "/s/stagé/a/b"]
    monkeypatch.setattr(mounts, "mount_points", lambda: points)
    below = mounts.mounts_below(Path("/s/stagé"))
    assert below == [Path("/s/stagé/a/b"), Path("/s/stagé/incus"), Path("/s/stagé")]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_a_busy_staging_mount_is_detached(tmp_path: Path) -> None:
    """A borg being stopped may still hold a file open in an instance's mount when the
    instance is released: the release must not fail (and keep it frozen) for that."""
    source, target = tmp_path / "data", tmp_path / "staging" / "data"
    source.mkdir()
    (source / "file").write_bytes(b"held open\n")
    mounts.bind_readonly(source, target)
    with (target / "file").open("rb") as held:
        with pytest.raises(UserError, match="busy"):
            mounts.unmount(target)
        mounts.unmount_or_detach(target)
        assert not mounts.is_mounted(target) and not list(target.iterdir())
        assert held.read() == b"held open\n"


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A shared mount, as / is under systemd: the live data's mount in a real server."""
    where = tmp_path / "shared"
    where.mkdir()
    mounts.share(where)
    yield where
    mounts.unmount(where, lazy=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_a_snapshot_stacked_over_a_staging_mount_stays_in_staging(shared: Path) -> None:
    """The hook-mode keeper stacks a snapshot over an item's live data mounted in staging:
    were the staging mount a peer of the live data's shared mount, the snapshot would cover
    the live instance itself, and releasing it would unmount the live mount."""
    live, snapshot, target = shared / "live", shared / "snap", shared / "staging" / "item"
    for path, text in ((live, "live\n"), (snapshot, "snapshot\n")):
        path.mkdir()
        (path / "file").write_text(text)
    (live / "disk.img").write_text("live image\n")
    (snapshot / "disk.img").write_text("snapshot image\n")
    mounts.bind_readonly(live, target)
    mounts.bind_readonly(live / "disk.img", target.parent / "disk.img")
    try:
        mounts.bind_readonly(snapshot, target)
        # A file target made before is on a read-only mount: binding over it must not touch it.
        mounts.bind_readonly(snapshot / "disk.img", target.parent / "disk.img")
        assert (target / "file").read_text() == "snapshot\n"
        assert (target.parent / "disk.img").read_text() == "snapshot image\n"
        assert (live / "file").read_text() == "live\n" and not mounts.is_mounted(live)
        for path in (target, target.parent / "disk.img"):
            mounts.unmount_top(path)
            mounts.unmount_top(path)  # only one stacked: the live mount below it stays
        assert (target / "file").read_text() == "live\n"
        assert (target.parent / "disk.img").read_text() == "live image\n"
    finally:
        for path in (target, target.parent / "disk.img"):
            mounts.unmount(path)
