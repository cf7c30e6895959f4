"""Config values that would only fail once a run has begun, refused before it begins; run names.

Pure functions only: no root, no Incus, no borg (the filesystem checks use tmp_path).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from incus_borg import layout, preflight
from incus_borg.config import Config, IncusSettings, Repository, Retention
from incus_borg.errors import UserError

WHEN = datetime(2024, 5, 10, 3, 4, 5)


def config(tmp_path: Path, **changes: Any) -> Config:
    """A configuration whose paths all lie apart under tmp_path."""
    values: dict[str, Any] = {
        "repositories": [Repository(path=str(tmp_path / "repo"), label="local")],
        "incus": IncusSettings(
            dir=str(tmp_path / "incus"),
            subuid=str(tmp_path / "subuid"),
            subgid=str(tmp_path / "subgid"),
        ),
        "staging_dir": str(tmp_path / "work" / "staging"),
    }
    return Config(**(values | changes))


def problem(cfg: Config) -> str:
    found = preflight.first_problem(cfg)
    assert found is not None
    return found


# --- run names -------------------------------------------------------------------------------


def test_run_name_fills_every_placeholder() -> None:
    name = layout.run_name("{hostname}-{member}-{now}-{utcnow:%H}", WHEN, hostname="h")
    assert name == f"h-h-2024-05-10T03:04:05-{WHEN.astimezone(UTC):%H}"
    assert layout.run_name("{now:%Y%m%d}", WHEN) == "20240510"
    assert layout.run_name("{fqdn}-{now}", WHEN)  # looked up only when used


def test_the_default_format_is_valid() -> None:
    assert layout.name_format_problem(Config().archive_name_format) is None


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("", "is empty"),
        ("{foo}-{now}", "unknown placeholder {foo}"),
        ("{}-{now}", "unknown placeholder {}"),
        ("{now.year}", "unknown placeholder {now.year}"),
        ("{hostname}@{now}", "containing '@'"),
        ("a/b-{now:%s}", "containing '/'"),
        ("{now:%D}", "containing '/'"),
        ("a::{now}", "containing '::'"),
        ("nightly", "has no {now} or {utcnow}"),
        ("{hostname}", "has no {now} or {utcnow}"),
        ("{now:fixed}", "same name at every time"),
        ("{now:%Q}", "unknown strftime directive %Q"),
        ("{now:%Y-%}", "unknown strftime directive %"),
        ("{now!r}", "conversion"),
        ("{hostname:%Y}-{now}", "cannot be formatted"),
        ("{now", "not a valid format"),
        ("{{x}}-{now}", "braces"),
        ("{now:%Y%n}", "control characters"),
        ("{now}.checkpoint", "checkpoints"),
    ],
)
def test_bad_name_formats(fmt: str, expected: str) -> None:
    found = layout.name_format_problem(fmt)
    assert found is not None and expected in found, found


@pytest.mark.parametrize("fmt", ["{now:%Y}", "{utcnow}", "x-{member}-{now:%s}", "{fqdn} {now}"])
def test_good_name_formats(fmt: str) -> None:
    assert layout.name_format_problem(fmt) is None


def test_name_format_refusal_names_the_key_and_a_fix(tmp_path: Path) -> None:
    with pytest.raises(UserError) as caught:
        preflight.check(config(tmp_path, archive_name_format="x@{now}"), tmp_path / "c.yaml")
    message = str(caught.value)
    assert message.startswith(f"config {tmp_path / 'c.yaml'}: 'archive_name_format'")
    assert Config().archive_name_format in message


# --- paths -----------------------------------------------------------------------------------


def test_a_good_config_passes(tmp_path: Path) -> None:
    assert preflight.first_problem(config(tmp_path)) is None


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"repositories": [Repository(path="backups/repo")]}, "repositories[0].path"),
        ({"staging_dir": "staging"}, "staging_dir"),
        ({"staging_dir": ""}, "staging_dir"),
        ({"incus": IncusSettings(dir="var/lib/incus")}, "incus.dir"),
        ({"incus": IncusSettings(subuid="subuid")}, "incus.subuid"),
        ({"incus": IncusSettings(subgid="./subgid")}, "incus.subgid"),
    ],
)
def test_relative_paths_are_refused(tmp_path: Path, changes: dict[str, Any], key: str) -> None:
    found = problem(config(tmp_path, **changes))
    assert f"'{key}'" in found and "absolute path" in found


@pytest.mark.parametrize(
    "path",
    ["ssh://borg@host:23/./repo", "borg@host:repo", "host:/srv/repo", "file:///srv/repo"],
)
def test_remote_and_file_urls_are_not_relative_paths(tmp_path: Path, path: str) -> None:
    assert preflight.first_problem(config(tmp_path, repositories=[Repository(path=path)])) is None


def test_file_url_must_be_absolute(tmp_path: Path) -> None:
    assert "relative path" in problem(config(tmp_path, repositories=[Repository(path="file://r")]))


@pytest.mark.parametrize(
    ("staging", "repository", "relation"),
    [
        ("backups", "backups", "is"),
        ("backups", "backups/incus-borg", "contains"),
        ("backups/incus-borg/staging", "backups/incus-borg", "lies inside"),
    ],
)
def test_staging_may_not_overlap_a_repository(
    tmp_path: Path, staging: str, repository: str, relation: str
) -> None:
    """Issue: staging_dir set to a directory holding the repository deleted it."""
    cfg = config(
        tmp_path,
        staging_dir=str(tmp_path / staging),
        repositories=[Repository(path=str(tmp_path / repository))],
    )
    found = problem(cfg)
    assert f"'staging_dir' {tmp_path / staging} {relation} 'repositories[0].path'" in found
    assert "choose a staging_dir apart" in found


def test_staging_may_not_overlap_the_incus_directory(tmp_path: Path) -> None:
    cfg = config(tmp_path, staging_dir=str(tmp_path / "incus" / "staging"))
    assert "lies inside 'incus.dir'" in problem(cfg)


def test_overlap_is_found_through_symlinks(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cfg = config(
        tmp_path,
        staging_dir=str(tmp_path / "link" / "staging"),
        repositories=[Repository(path=str(tmp_path / "real" / "staging" / "repo"))],
    )
    assert "contains 'repositories[0].path'" in problem(cfg)


def test_remote_repositories_never_overlap(tmp_path: Path) -> None:
    cfg = config(tmp_path, repositories=[Repository(path=f"ssh://h{tmp_path}/work/staging")])
    assert preflight.first_problem(cfg) is None


def test_staging_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "work").write_text("")
    found = problem(config(tmp_path))
    assert "'staging_dir'" in found and "is not a directory" in found


def test_staging_that_cannot_be_written_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.access is faked: root writes through directory modes."""
    (tmp_path / "work").mkdir(mode=0o500)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path / "work")
    found = problem(config(tmp_path))
    assert f"{tmp_path / 'work'} is not writable" in found


def test_staging_on_a_read_only_filesystem_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.statvfs is faked: mounting needs root (tests/test_runs.py mounts a real one)."""
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, path: Any) -> None:
            self.f_flag = real_statvfs(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", ReadOnly)
    found = problem(config(tmp_path))
    assert f"'staging_dir' {tmp_path / 'work' / 'staging'}: {tmp_path} is on a read-only" in found


# --- retention -------------------------------------------------------------------------------


def test_retention_must_keep_something(tmp_path: Path) -> None:
    nothing = Retention(keep_daily=0, keep_weekly=0, keep_monthly=0)
    assert "'retention' keeps nothing" in problem(config(tmp_path, retention=nothing))
    repo = Repository(path=str(tmp_path / "repo"), retention=Retention(keep_weekly=-1))
    assert "'repositories[0].retention.keep_weekly' is negative" in problem(
        config(tmp_path, repositories=[repo])
    )
