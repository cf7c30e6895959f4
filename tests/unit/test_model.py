"""Pure parts of the model: how a mode is resolved, the manifest read across its formats,
borg command lines, and configuration errors on nested keys."""

from __future__ import annotations

import json

import pytest

from incus_borg import config, layout
from incus_borg.backup.plan import effective_mode, user_snapshots
from incus_borg.borg import comment_argv, create_argv, extract_argv, list_exact_argv
from incus_borg.config import Repository
from incus_borg.errors import UserError
from incus_borg.manifest import FORMAT_VERSION, Item, Manifest


@pytest.mark.parametrize(
    ("requested", "driver", "running", "mode"),
    [
        ("auto", "btrfs", True, "snapshot"),
        ("auto", "dir", True, "freeze"),
        ("auto", "dir", False, "idle"),
        ("stop", "dir", True, "stop"),
        ("snapshot", "dir", True, "snapshot"),
        ("none", "btrfs", True, "none"),
        ("none", "dir", False, "none"),
    ],
)
def test_mode_resolution(requested: str, driver: str, running: bool, mode: str) -> None:
    assert effective_mode(requested, driver, running) == mode


def test_temporary_snapshots_are_not_the_admins() -> None:
    assert user_snapshots(["snap1", layout.SNAPSHOT_PREFIX + "20260101", "x"]) == ["snap1", "x"]


def item(**changes: object) -> Item:
    fields = {
        "kind": "instance",
        "project": "default",
        "name": "c1",
        "pool": "default",
        "driver": "dir",
        "type": "container",
        "snapshots": ["s1"],
        "state": "Running",
        "mode": "freeze",
        "path": "instances/default/c1",
    }
    return Item(**{**fields, **changes})  # type: ignore[arg-type]


def manifest(**changes: object) -> Manifest:
    fields = {
        "hostname": "h",
        "run": "h-1",
        "created": "2026-12-01T10:00:00+00:00",
        "incus_version": "6.0.4",
        "borg_version": "1.4.5",
        "mode": "auto",
        "hook_mode": False,
        "database": "exact",
        "daemon_downtime": 0.7,
        "instances": [item(window=0.2)],
    }
    return Manifest(**{**fields, **changes})  # type: ignore[arg-type]


def test_the_manifest_round_trips() -> None:
    written = manifest()
    read = Manifest.from_json(written.to_json())
    assert read == written and read.format == FORMAT_VERSION == 3


def test_a_format_1_manifest_is_read_with_its_part_archives() -> None:
    old = json.loads(manifest().to_json())
    old["format"] = 1
    old["instances"][0]["archive"] = "h-1@instance@default@c1"
    for key in ("partial", "incus_borg_version", "member"):
        old.pop(key, None)
    for gone in ("users", "failed"):
        old["instances"][0].pop(gone, None)
    old["instances"][0]["a_field_from_elsewhere"] = 1  # unknown fields are ignored
    read = Manifest.from_json(json.dumps(old))
    assert read.format == 1 and read.partial is False
    assert read.instances[0].archive == "h-1@instance@default@c1"
    assert read.instances[0].users == [] and read.instances[0].failed is None


def test_a_newer_manifest_is_refused() -> None:
    newer = json.loads(manifest().to_json()) | {"format": FORMAT_VERSION + 1}
    with pytest.raises(UserError, match="upgrade incus-borg"):
        Manifest.from_json(json.dumps(newer))


REPO = Repository(path="/r", label="r")


def test_create_reads_relative_paths_with_the_files_cache_and_the_comment() -> None:
    argv = create_argv(
        REPO, "run", ["incus", "instances/default/c1", "manifest.json"],
        excludes=["sh:incus/logs"], files_cache="mtime,size", comment="incus-borg run=complete",
    )  # fmt: skip
    assert argv[0] == "create" and "--numeric-ids" in argv and "--json" in argv
    assert argv[argv.index("--files-cache") + 1] == "mtime,size"
    assert argv[argv.index("--comment") + 1] == "incus-borg run=complete"
    assert argv[argv.index("--exclude") + 1] == "sh:incus/logs"
    assert argv[-4:] == ["/r::run", "incus", "instances/default/c1", "manifest.json"]


def test_extract_keeps_owners_and_holes_and_excludes_subtrees() -> None:
    argv = extract_argv(REPO, "run", ["instances/p/n/backup"], 3, ["instances/p/n/backup/x"])
    assert argv[:5] == ["extract", "--numeric-ids", "--sparse", "--strip-components", "3"]
    assert argv[5:7] == ["--exclude", "pp:instances/p/n/backup/x"]


def test_exact_listing_escapes_paths() -> None:
    argv = list_exact_argv(REPO, "run", ["a+b/index.yaml", "c"])
    assert "+ re:^(a\\+b/index\\.yaml|c)$" in argv and argv[-1] == "/r::run"


def test_a_comment_is_changed_in_place() -> None:
    assert comment_argv(REPO, "run", "x") == ["recreate", "--comment", "x", "/r::run"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("repositories: [{path: /r, lock_wait: soon}]", "'repositories[0].lock_wait' must be"),
        ("incus: {dir: 3}", "'incus.dir' must be a string, got int"),
        ("retention: {keep_daily: true}", "'retention.keep_daily' must be an integer"),
        ("repositories: [{path: /r, colour: red}]", "unknown key 'colour' under 'repositories[0]'"),
        ("mode: sometimes", "'mode' must be one of auto, snapshot, freeze, stop, none"),
    ],
)
def test_config_errors_name_the_nested_key(text: str, message: str) -> None:
    with pytest.raises(UserError, match=r"^config c\.yaml: ") as caught:
        config.parse(text, "c.yaml")
    assert message in str(caught.value)
