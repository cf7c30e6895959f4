"""Restored files against the archive's record: hard links are compared by the file they
link to, and must be one inode with it."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

from incus_borg.restore.compare import differing, under

ROOT = "instances/default/c1/backup/container/rootfs"


def record(path: Path, archived: str, source: str = "") -> str:
    """The `borg list --json-lines` line of a file as borg records it: a further name of a
    file (`source`: its first name) as a hard link, without a digest."""
    st = path.lstat()
    mode = stat.filemode(st.st_mode)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
    if source:
        mode, digest = "h" + mode[1:], ""
    entry = {"path": archived, "mode": mode, "uid": st.st_uid, "gid": st.st_gid}
    return json.dumps(entry | {"sha256": digest, "source": source})


def restored(tmp_path: Path) -> tuple[Path, str]:
    """A restored tree whose `b` has two further names, `a` (sorting before it) and `c`
    (after it), and the archive's listing of it."""
    top = tmp_path / "rootfs"
    (top / "d").mkdir(parents=True)
    (top / "d" / "b").write_bytes(b"shared content\n")
    os.link(top / "d" / "b", top / "d" / "a")
    os.link(top / "d" / "b", top / "d" / "c")
    (top / "plain").write_bytes(b"plain\n")
    lines = [
        record(top / "d", f"{ROOT}/d"),
        record(top / "d" / "b", f"{ROOT}/d/b"),
        record(top / "d" / "a", f"{ROOT}/d/a", source=f"{ROOT}/d/b"),
        record(top / "d" / "c", f"{ROOT}/d/c", source=f"{ROOT}/d/b"),
        record(top / "plain", f"{ROOT}/plain"),
    ]
    return top, "\n".join(lines) + "\n"


def test_hard_links_in_both_orders_match(tmp_path: Path) -> None:
    top, listing = restored(tmp_path)
    assert differing(listing, under(ROOT, top)) == (5, [])


def test_a_changed_hard_link_is_the_one_reported(tmp_path: Path) -> None:
    top, listing = restored(tmp_path)
    (top / "d" / "a").unlink()
    (top / "d" / "a").write_bytes(b"other content\n")
    assert differing(listing, under(ROOT, top)) == (5, [f"{ROOT}/d/a"])


def test_a_changed_first_name_is_the_one_reported(tmp_path: Path) -> None:
    """The file the links name is replaced: it alone differs; its further names still hold
    the archived content, as one inode with each other."""
    top, listing = restored(tmp_path)
    (top / "d" / "b").unlink()
    (top / "d" / "b").write_bytes(b"other content\n")
    assert differing(listing, under(ROOT, top)) == (5, [f"{ROOT}/d/b"])


def test_a_first_name_restored_as_a_copy_is_the_one_reported(tmp_path: Path) -> None:
    """Its further names still share one inode: the first name is the one apart."""
    top, listing = restored(tmp_path)
    (top / "d" / "b").unlink()
    (top / "d" / "b").write_bytes(b"shared content\n")
    os.chmod(top / "d" / "b", 0o644)
    assert differing(listing, under(ROOT, top)) == (5, [f"{ROOT}/d/b"])


def test_a_hard_link_restored_as_a_copy_is_reported(tmp_path: Path) -> None:
    top, listing = restored(tmp_path)
    (top / "d" / "c").unlink()
    (top / "d" / "c").write_bytes((top / "d" / "b").read_bytes())  # same bytes, other inode
    os.chmod(top / "d" / "c", 0o644)
    assert differing(listing, under(ROOT, top)) == (5, [f"{ROOT}/d/c"])


def test_changed_content_of_the_linked_file_shows_on_every_name(tmp_path: Path) -> None:
    top, listing = restored(tmp_path)
    (top / "d" / "b").write_bytes(b"changed\n")  # one inode: all three names change
    assert differing(listing, under(ROOT, top))[1] == [f"{ROOT}/d/{n}" for n in "bac"]


def test_a_hard_link_to_a_file_outside_the_listing_is_reported(tmp_path: Path) -> None:
    top, listing = restored(tmp_path)
    lines = [line for line in listing.splitlines() if json.loads(line)["path"] != f"{ROOT}/d/b"]
    assert len(lines) == 4
    compared, wrong = differing("\n".join(lines), under(ROOT, top))
    assert (compared, wrong) == (4, [f"{ROOT}/d/a", f"{ROOT}/d/c"])
