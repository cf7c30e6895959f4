"""What a run is (comments, checkpoints, grouping of a listing) and which runs `prune` keeps.

Pure functions only: no root, no Incus, no borg.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from incus_borg import layout, runs
from incus_borg.config import Retention
from incus_borg.runs import COMPLETE, INCOMPLETE, PARTIAL, Archive, Run, retention

T0 = datetime(2024, 5, 10, 3, 0, 0)
ONE_DAILY = Retention(keep_daily=1, keep_weekly=0, keep_monthly=0)


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def run(name: str, hours: float, state: str | None) -> Run:
    return Run(name, at(hours), state, [name])


def names(pairs: list[tuple[Run, str]]) -> list[str]:
    return [r.name for r, _ in pairs]


# --- comments and names ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("comment", "state"),
    [
        (layout.run_comment(False), "complete"),
        (layout.run_comment(True), "partial"),
        ("incus-borg", "unknown"),  # older versions: the state is in the manifest
        ("incus-borg run=later", "unknown"),
        ("", None),
        ("made by borgmatic", None),
        ("incus-borgish run=complete", None),
    ],
)
def test_comment_says_the_state(comment: str, state: str | None) -> None:
    assert layout.parse_comment(comment) == state


def test_comments_are_what_older_versions_recognise() -> None:
    for partial in (False, True):
        assert layout.run_comment(partial).split()[0] == layout.RUN_COMMENT


@pytest.mark.parametrize(
    ("name", "base"),
    [
        ("h-2024.checkpoint", "h-2024"),
        ("h-2024.checkpoint.2", "h-2024"),
        ("h-2024@instance@default@c1.checkpoint", "h-2024@instance@default@c1"),
        ("h-2024", None),
        ("h-2024.checkpointed", None),
    ],
)
def test_checkpoint_names(name: str, base: str | None) -> None:
    assert layout.checkpoint_of(name) == base


def test_checkpoint_takes_the_comment_from_its_command_line() -> None:
    """Borg saves checkpoints without the comment; the command line still holds it."""
    entry = {
        "name": "h-1@instance@default@c1.checkpoint",
        "start": "2024-05-10T03:00:00.000000",
        "comment": "",
        "command_line": ["borg", "create", "--comment", "incus-borg run=partial", "r::x", "p"],
    }
    assert Archive.from_listing(entry).state == PARTIAL
    foreign = {**entry, "command_line": ["borg", "create", "r::x", "p"]}
    assert Archive.from_listing(foreign).state is None
    assert runs.given_comment(["--comment=incus-borg", "x"]) == "incus-borg"


# --- grouping a listing into runs ----------------------------------------------------------


def archive(name: str, hours: float, state: str | None = COMPLETE) -> Archive:
    return Archive(name, at(hours), state)


def test_a_format_1_run_is_its_archive_and_its_parts() -> None:
    found = runs.group(
        [
            archive("r1@instance@default@c1", 0),
            archive("r1@volume@p@default@v", 0.1),
            archive("r1", 0.2),
        ]
    )
    assert [(r.name, r.state, r.parts) for r in found] == [("r1", COMPLETE, 2)]
    assert found[0].archives[0] == "r1"


def test_a_format_2_run_is_one_archive() -> None:
    (found,) = runs.group([archive("r2", 0, PARTIAL)])
    assert (found.name, found.state, found.parts, found.archives) == ("r2", PARTIAL, 0, ["r2"])


def test_orphan_parts_and_checkpoints_are_incomplete_runs() -> None:
    found = runs.group(
        [
            archive("r1@instance@default@c1", 0),
            archive("r1@instance@default@c2.checkpoint", 0.1),
            archive("r2.checkpoint", 1),
            archive("r3@instance@default@c1", 2),
            archive("r3", 2.1),
            archive("foreign.checkpoint", 3, None),
            archive("foreign@x", 3, None),
            archive("borgmatic-run", 4, None),
        ]
    )
    by_name = {(r.name, r.state): r for r in found}
    assert set(by_name) == {
        ("r1", INCOMPLETE),
        ("r2", INCOMPLETE),
        ("r3", COMPLETE),
        ("borgmatic-run", None),
    }
    r1 = by_name[("r1", INCOMPLETE)]
    assert r1.archives == ["r1@instance@default@c1", "r1@instance@default@c2.checkpoint"]
    assert r1.start == at(0.1)  # its newest archive
    assert by_name[("r2", INCOMPLETE)].archives == ["r2.checkpoint"]
    assert not by_name[("borgmatic-run", None)].ours
    assert [r.name for r in found] == ["r1", "r2", "r3", "borgmatic-run"]  # oldest first


def test_latest_candidates() -> None:
    found = [
        run("c", 0, COMPLETE),
        run("o", 1, None),
        run("p", 2, PARTIAL),
        run("i", 3, INCOMPLETE),
    ]
    assert [r.name for r in runs.candidates(found, complete=False)] == ["p", "o", "c"]
    assert [r.name for r in runs.candidates(found, complete=True)] == ["o", "c"]


# --- retention ------------------------------------------------------------------------------


def test_partial_run_never_displaces_a_complete_one() -> None:
    """backup; backup --instance X; prune (issue: the partial run was the day's only one kept)."""
    found = [run("full", 0, COMPLETE), run("one", 1, PARTIAL)]
    chosen = retention.select(found, ONE_DAILY)
    assert names(chosen.keep) == ["full", "one"]
    assert chosen.delete == []


def test_partial_runs_older_than_a_kept_complete_run_go() -> None:
    found = [
        run("full-1", -48, COMPLETE),
        run("one-1", -47, PARTIAL),
        run("full-2", 0, COMPLETE),
        run("one-2", 1, PARTIAL),
    ]
    chosen = retention.select(found, Retention(keep_daily=7, keep_weekly=0, keep_monthly=0))
    assert names(chosen.keep) == ["full-1", "full-2", "one-2"]
    assert names(chosen.delete) == ["one-1"]
    assert "older than a kept complete run" in chosen.delete[0][1]


def test_partial_runs_after_the_newest_complete_one_are_kept_by_the_policy() -> None:
    """Only partial runs (as `instances:` makes them): the policy applies to them alone."""
    found = [run(f"p{i}", i * 6, PARTIAL) for i in range(8)]  # two days, four a day
    chosen = retention.select(found, ONE_DAILY)
    assert names(chosen.keep) == ["p7"]
    assert names(chosen.delete) == [f"p{i}" for i in range(7)]
    two_days = retention.select(found, Retention(keep_daily=2, keep_weekly=0, keep_monthly=0))
    assert names(two_days.keep) == ["p3", "p7"]


def test_complete_runs_follow_the_policy() -> None:
    found = [run(f"c{i}", i * 24, COMPLETE) for i in range(10)]
    chosen = retention.select(found, Retention(keep_daily=3, keep_weekly=0, keep_monthly=0))
    assert names(chosen.keep) == ["c7", "c8", "c9"]
    assert [why for _, why in chosen.keep] == ["keep_daily"] * 3


def test_incomplete_runs_go_once_older_than_the_newest_complete_run() -> None:
    older = Run("broken-1", at(-1), INCOMPLETE, ["broken-1@instance@default@c1"])
    newer = Run("broken-2", at(2), INCOMPLETE, ["broken-2.checkpoint"])
    chosen = retention.select([older, run("full", 0, COMPLETE), newer], ONE_DAILY)
    assert names(chosen.delete) == ["broken-1"]
    assert names(chosen.keep) == ["full", "broken-2"]
    alone = retention.select([older], ONE_DAILY)
    assert names(alone.keep) == ["broken-1"] and alone.delete == []


def test_an_incomplete_run_may_share_its_name_with_a_run() -> None:
    full = run("r", 0, COMPLETE)
    leftover = Run("r", at(-1), INCOMPLETE, ["r.checkpoint"])
    later = run("s", 1, COMPLETE)
    chosen = retention.select(
        [leftover, full, later], Retention(keep_daily=0, keep_weekly=1, keep_monthly=0)
    )
    assert [(r.name, r.state) for r, _ in chosen.keep] == [("s", COMPLETE)]
    assert [(r.archives, r.state) for r, _ in chosen.delete] == [
        (["r.checkpoint"], INCOMPLETE),
        (["r"], COMPLETE),
    ]


def test_other_programs_archives_are_never_chosen() -> None:
    chosen = retention.select([run("borgmatic", 0, None), run("full", 1, COMPLETE)], ONE_DAILY)
    assert names(chosen.keep) == ["full"] and chosen.delete == []
