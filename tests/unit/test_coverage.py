"""The status states, max_age, the local index and the metrics' content.

Pure functions only: no root, no Incus, no borg.
"""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from incus_borg import config
from incus_borg.errors import UserError
from incus_borg.monitoring import coverage, metrics
from incus_borg.monitoring.coverage import FAILED, NEVER, OK, SKIPPED, STALE, Live
from incus_borg.monitoring.index import Ending, Entry, Index, IndexFile, Run, Stored
from incus_borg.monitoring.notify import HIDDEN, redact, tail, where

NOW = 1_800_000_000.0
HOUR = 3600.0
AGES = {"local": 26 * HOUR, "offsite": 8 * 24 * HOUR}


def entry(name: str, failed: str | None = None, window: float | None = 0.5) -> Entry:
    return Entry("instance", "default", name, "default", window, 2, failed)


def run(
    name: str, hours_ago: float, items: list[Entry], repos: tuple[str, ...] = ("local", "offsite")
) -> Run:
    return Run(
        run=name,
        member="host",
        hostname="host",
        created="2027-01-15T08:00:00+00:00",
        mode="auto",
        hook_mode=False,
        partial=False,
        daemon_downtime=1.2,
        items=items,
        repositories={r: Stored(name, 1000, 10, 5, 5000) for r in repos},
        finished=NOW - hours_ago * HOUR,
    )


def index(*runs: Run) -> Index:
    found = Index()
    for r in runs:
        found.add(r)
    return found


def live(name: str, skipped: str | None = None) -> Live:
    return Live("instance", "default", name, "default", "host", skipped)


def state_of(name: str, idx: Index, ages: dict[str, float] = AGES, item: Live | None = None) -> str:
    (found,) = coverage.assess([item or live(name)], idx, ages, NOW)
    return found.state


# --- max_age ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("26h", 26 * HOUR), ("1s", 1), ("90m", 5400), ("8d", 8 * 86400), ("1w", 604800),
     ("1d12h", 36 * HOUR), (" 2 h ", 2 * HOUR), ("1.5h", 1.5 * HOUR)],
)  # fmt: skip
def test_max_age_parsing(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "26", "h", "26 hours", "-1h", "1h-", "soon"])
def test_max_age_refused(text: str) -> None:
    assert config.parse_duration(text) is None
    with pytest.raises(UserError, match="'max_age' must be a number with s, m, h, d or w"):
        config.parse(f"max_age: '{text}'\n", "c.yaml")


def test_max_age_per_repository() -> None:
    parsed = config.parse(
        "max_age: 2h\nrepositories: [{path: /a, label: a}, {path: /b, label: b, max_age: 3d}]\n",
        "c.yaml",
    )
    assert coverage.limits(parsed, None) == {"a": 2 * HOUR, "b": 3 * 86400}
    assert coverage.limits(parsed, "b") == {"b": 3 * 86400}
    with pytest.raises(UserError, match=r"'repositories\[0\].max_age'"):
        config.parse("repositories: [{path: /a, max_age: often}]\n", "c.yaml")


# --- states ----------------------------------------------------------------------------------


def test_ok_when_every_repository_is_young_enough() -> None:
    assert state_of("a", index(run("r1", 2, [entry("a")]))) == OK


def test_never_when_no_run_holds_it() -> None:
    idx = index(run("r1", 2, [entry("b")]))
    assert state_of("a", idx) == NEVER
    assert state_of("a", Index()) == NEVER


def test_stale_per_repository_max_age() -> None:
    idx = index(run("r1", 30, [entry("a")]))  # 30 h: past local's 26 h, within offsite's 8 d
    (found,) = coverage.assess([live("a")], idx, AGES, NOW)
    assert found.state == STALE
    assert "its newest run in local is 1d6h old (max_age 1d2h)" in found.reason
    assert "offsite" not in found.reason
    assert state_of("a", idx, {"offsite": AGES["offsite"]}) == OK


def test_stale_when_one_repository_holds_no_run() -> None:
    idx = index(run("r1", 1, [entry("a")], repos=("local",)))
    (found,) = coverage.assess([live("a")], idx, AGES, NOW)
    assert found.state == STALE and found.reason == "repository offsite holds no run of it"


def test_failed_when_the_last_run_left_it_out() -> None:
    good, bad = run("r1", 5, [entry("a")]), run("r2", 1, [entry("a", "could not be quiesced")])
    (found,) = coverage.assess([live("a")], index(good, bad), AGES, NOW)
    assert found.state == FAILED
    assert found.reason == "left out of r2: could not be quiesced"
    assert found.run is not None and found.run.run == "r1"  # the newest run holding it
    assert state_of("a", index(bad)) == FAILED  # never held at all: still FAILED, with why
    later = run("r3", 0.5, [entry("a")])
    assert state_of("a", index(good, bad, later)) == OK


def test_skipped_wins_and_keeps_its_reason() -> None:
    item = live("a", skipped="user.incus-borg.mode=skip")
    (found,) = coverage.assess([item], Index(), AGES, NOW)
    assert (found.state, found.reason) == (SKIPPED, "user.incus-borg.mode=skip")


def test_unattributed_hook_run_counts_for_every_repository() -> None:
    hook = run("h1", 1, [entry("a", window=None)], repos=())
    hook.attributed, hook.hook_mode = False, True
    (found,) = coverage.assess([live("a")], index(hook), AGES, NOW)
    assert found.state == OK and found.repositories == ["hook"]


def test_gone_lists_what_runs_hold_of_deleted_instances() -> None:
    idx = index(run("r1", 3, [entry("a"), entry("old")]), run("r2", 1, [entry("a")]))
    (gone,) = coverage.gone([live("a")], idx, AGES)
    assert (gone.name, gone.exists, gone.run and gone.run.run) == ("old", False, "r1")


def test_exit_code_and_counts() -> None:
    idx = index(run("r1", 1, [entry("a")]))
    found = coverage.assess([live("a"), live("b"), live("c", "skip")], idx, AGES, NOW)
    assert [s.state for s in found] == [OK, NEVER, SKIPPED]
    assert coverage.exit_code(found) == 1
    assert coverage.exit_code([found[0], found[2]]) == 0
    assert coverage.counts(found) == {OK: 1, STALE: 0, FAILED: 0, NEVER: 1, SKIPPED: 1}


@pytest.mark.parametrize(
    ("raw", "selection", "reason"),
    [
        ({"name": "a", "project": "default"}, [], None),
        ({"name": "a", "project": "default"}, ["b"], "not among `instances:`"),
        ({"name": "a", "project": "p"}, ["p/a"], None),
        ({"name": "a", "project": "p"}, ["q/a"], "not among `instances:`"),
        ({"name": "a", "project": "p", "expanded_config": {coverage.POLICY_KEY: "skip"}}, [],
         "user.incus-borg.mode=skip"),
    ],
)  # fmt: skip
def test_skip_reasons(raw: dict[str, object], selection: list[str], reason: str | None) -> None:
    found = coverage.skip_reason(raw, selection, coverage.selected(raw, selection))
    assert (found or None) == reason or (reason and found and found.startswith(reason))


def test_age_and_size_text() -> None:
    assert [coverage.age_text(s) for s in (5, 61, 3600, 93600, 90000)] == [
        "5s", "1m1s", "1h", "1d2h", "1d1h",
    ]  # fmt: skip
    assert [coverage.size_text(n) for n in (None, 999, 12_345, 12_345_678)] == [
        "-", "999 B", "12.3 kB", "12.3 MB",
    ]  # fmt: skip


# --- the index -------------------------------------------------------------------------------


def test_index_round_trip_is_atomic_and_private(tmp_path: Path) -> None:
    file = IndexFile(tmp_path / "staging")
    assert file.path == tmp_path / "staging.index.json"
    with file.update() as idx:
        idx.add(run("r1", 1, [entry("a")]))
        idx.commands["backup"] = Ending(0, NOW, 3.5)
    assert stat.S_IMODE(file.path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    again = file.load()
    assert again.runs["r1"].items == [entry("a")] and again.commands["backup"].duration == 3.5


def test_damaged_index_says_how_to_rebuild(tmp_path: Path) -> None:
    file = IndexFile(tmp_path / "staging")
    file.path.write_text("{not json")
    with pytest.raises(UserError, match="status --refresh"):
        file.load()


def test_index_merges_and_forgets() -> None:
    hook = run("h1", 1, [entry("a")], repos=())
    hook.attributed = False
    idx = index(hook)
    found = run("h1", 1, [entry("a")], repos=("bm",))
    found.repositories["bm"] = Stored("borgmatic-archive")
    idx.add(found)  # a refresh found it in bm
    assert idx.runs["h1"].attributed and set(idx.runs["h1"].repositories) == {"bm"}
    assert idx.archives("bm") == {"borgmatic-archive"}
    idx.forget("bm", {"borgmatic-archive"})  # pruned: held nowhere now
    assert idx.runs == {}
    two = index(run("r1", 1, [entry("a")]))
    two.forget("local", {"r1"})
    assert set(two.runs["r1"].repositories) == {"offsite"}


# --- metrics ---------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_content() -> None:
    older = run("r1", 30, [entry("a", window=2.0), entry("b")])
    newer = run("r2", 1, [entry("a", window=0.25), entry("b", "could not be quiesced")])
    newer.repositories = {"local": Stored("r2", 2000, 20, 6, 9000)}
    idx = index(older, newer)
    idx.commands["backup"] = Ending(1, NOW, 12.5)
    found = coverage.assess([live("a"), live("b"), live("c")], idx, AGES, NOW)
    text = generate_latest(metrics.build(idx, found, "host")).decode()
    got = samples(text)
    item = {"kind": "instance", "project": "default", "pool": "", "member": "host"}

    def get(metric: str, **labels: str) -> float:
        return got["incus_borg_" + metric, frozenset(labels.items())]

    success = "last_success_timestamp_seconds"
    assert get(success, **item, name="a", repository="local") == NOW - HOUR
    assert get(success, **item, name="a", repository="offsite") == NOW - 30 * HOUR
    assert get(success, **item, name="b", repository="local") == NOW - 30 * HOUR  # r2 left it out
    assert not [k for k in got if k[0].endswith(success) and ("name", "c") in k[1]]
    assert get("quiesce_window_seconds", **item, name="a") == 0.25
    assert get("run_bytes_read", repository="local", member="host") == 2000
    assert get("run_bytes_added", repository="offsite", member="host") == 10  # r1's, newest there
    assert get("repository_size_bytes", repository="local", member="host") == 9000
    assert get("daemon_downtime_seconds", member="host") == 1.2
    assert get("last_exit_code", command="backup", member="host") == 1
    assert get("last_run_duration_seconds", command="backup", member="host") == 12.5
    assert get("last_run_timestamp_seconds", command="backup", member="host") == NOW
    counts = {state: get("items", kind="instance", state=state, member="host") for state in
              coverage.STATES}  # fmt: skip
    assert counts == {OK: 1, STALE: 0, FAILED: 1, NEVER: 1, SKIPPED: 0}


def test_metrics_without_the_server_name_what_the_index_knows() -> None:
    idx = index(run("r1", 1, [entry("a")]))
    text = generate_latest(metrics.build(idx, None, "host")).decode()
    assert "incus_borg_items" not in text  # the states need the live server
    assert 'name="a"' in text


# --- notification bodies ---------------------------------------------------------------------


def test_bodies_never_hold_a_passphrase() -> None:
    log = ["starting", "BORG_PASSPHRASE=correct horse battery staple leaked", "done"]
    body = tail(log, ["correct horse battery staple", None, "other"])
    assert "correct horse" not in body and HIDDEN in body and body.endswith("done")
    assert redact("a secretsecret b", ["secret", "secretsecret"]) == f"a {HIDDEN} b"
    assert len(tail([str(k) * 500 for k in range(100)], [])) <= 10_000


def test_urls_are_named_without_credentials() -> None:
    assert where("https://hc-ping.com/1234-uuid/fail?x=1") == "https://hc-ping.com"
    assert where("mailtos://user:pass@mail.example.net:465/to") == "mailtos://mail.example.net:465"
