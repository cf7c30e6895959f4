"""Runs of cluster members: their names, their comments, and whose runs `latest` means."""

from __future__ import annotations

from datetime import datetime

import pytest

from incus_borg import layout, runs
from incus_borg.config import Config

WHEN = datetime(2024, 5, 10, 3, 4, 5)


def test_the_default_name_is_the_member_on_a_cluster_and_the_host_elsewhere() -> None:
    fmt = Config().archive_name_format
    assert layout.run_name(fmt, WHEN, hostname="h") == "h-2024-05-10T03:04:05"
    assert layout.run_name(fmt, WHEN, hostname="h", member="m1") == "m1-2024-05-10T03:04:05"


def test_a_format_without_member_gets_it_appended_on_a_cluster() -> None:
    assert layout.run_name("{hostname}-{now}", WHEN, "h") == "h-2024-05-10T03:04:05"
    one, two = (layout.run_name("{hostname}-{now}", WHEN, "h", m) for m in ("m1", "m2"))
    assert (one, two) == ("h-2024-05-10T03:04:05-m1", "h-2024-05-10T03:04:05-m2")


@pytest.mark.parametrize(
    ("comment", "member"),
    [
        (layout.run_comment(False, "m1"), "m1"),
        (layout.run_comment(True, "m2"), "m2"),
        (layout.run_comment(False), None),
        ("incus-borg", None),  # a run of an older version
        ("incus-borgish member=m1", None),
        ("", None),
    ],
)
def test_the_comment_names_the_member(comment: str, member: str | None) -> None:
    assert layout.comment_member(comment) == member


def test_the_comment_still_tells_the_state() -> None:
    assert layout.parse_comment(layout.run_comment(True, "m1")) == layout.PARTIAL
    assert layout.parse_comment(layout.run_comment(False, "m1")) == layout.COMPLETE


def _listing(
    name: str, hour: int, comment: str, argv: list[str] | None = None
) -> dict[str, object]:
    start = f"2024-05-10T{hour:02}:00:00"
    return {"name": name, "start": start, "comment": comment, "command_line": argv or []}


def test_latest_means_one_members_runs() -> None:
    found = runs.group(
        runs.Archive.from_listing(entry)
        for entry in (
            _listing("old", 1, layout.run_comment(False)),
            _listing("m1-a", 2, layout.run_comment(False, "m1")),
            _listing("m2-a", 3, layout.run_comment(False, "m2")),
            # Borg saves a checkpoint without the comment: its command line has it.
            _listing(
                "m1-b.checkpoint", 4, "", ["borg", "--comment", layout.run_comment(False, "m1")]
            ),
        )
    )
    assert [(r.member, r.state) for r in found][1:] == [
        ("m1", runs.COMPLETE),
        ("m2", runs.COMPLETE),
        ("m1", runs.INCOMPLETE),
    ]
    newest = [r.name for r in runs.candidates(found, False, runs.Scope("m1"))]
    assert newest == ["m1-a"]
    assert [r.name for r in runs.candidates(found, False, runs.Scope(None))] == ["old"]
    assert [r.name for r in runs.candidates(found, False)] == ["m2-a", "m1-a", "old"]
    assert runs.members(found) == ["m1", "m2"]
