"""Per-instance policy keys: where each came from, what is refused, how the mode resolves,
and the Borg patterns an `exclude` key becomes."""

from __future__ import annotations

import re
from typing import Any

import pytest

from incus_borg.backup import plan, policy
from incus_borg.errors import UserError
from incus_borg.manifest import Item

K = policy.PREFIX


def instance(own: dict[str, str], profiles: list[tuple[str, dict[str, str]]]) -> dict[str, Any]:
    """An instance as the API shows it: its own config, expanded with its profiles'."""
    expanded: dict[str, str] = {}
    for _, config in profiles:
        expanded |= config
    return {"config": own, "expanded_config": expanded | own}


def resolve(
    own: dict[str, str],
    profiles: list[tuple[str, dict[str, str]]] | None = None,
    configured: str = "auto",
    command_line: str | None = None,
) -> policy.Policy:
    raw = instance(own, profiles or [])
    return policy.instance_policy("default/c1", raw, profiles or [], configured, command_line)


def test_no_keys_take_the_configuration() -> None:
    chosen = resolve({})
    assert (chosen.mode, chosen.mode_source) == ("auto", "configuration")
    assert (chosen.pre, chosen.post, chosen.excludes) == (None, None, [])
    assert chosen.timeout == 300


def test_instance_key_overrides_the_configuration() -> None:
    chosen = resolve({K + "mode": "stop"}, configured="freeze")
    assert (chosen.mode, chosen.mode_source) == ("stop", "instance")


def test_the_last_profile_setting_a_key_is_its_source() -> None:
    profiles = [
        ("base", {K + "mode": "freeze", K + "pre": "echo base"}),
        ("backup-db", {K + "mode": "snapshot"}),
        ("other", {"user.note": "x"}),
    ]
    chosen = resolve({}, profiles)
    assert (chosen.mode, chosen.mode_source) == ("snapshot", "profile backup-db")
    assert chosen.pre == "echo base"
    keys = policy.settings(instance({}, profiles)["expanded_config"], {}, profiles)
    assert keys["pre"] == policy.Setting("echo base", "profile base")


def test_instance_key_overrides_a_profile() -> None:
    profiles = [("backup-db", {K + "mode": "freeze", K + "post": "echo profile"})]
    chosen = resolve({K + "post": "echo mine"}, profiles)
    assert chosen.post == "echo mine"
    assert chosen.mode_source == "profile backup-db"
    keys = policy.settings(
        instance({K + "post": "x"}, profiles)["expanded_config"], {K + "post": "x"}, profiles
    )
    assert keys["post"].source == "instance"


def test_command_line_overrides_every_source() -> None:
    chosen = resolve({K + "mode": "skip"}, configured="freeze", command_line="snapshot")
    assert (chosen.mode, chosen.mode_source) == ("snapshot", "command line")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("mode", "sometimes", "is not one of auto, snapshot, freeze, stop, none, skip"),
        ("timeout", "soon", "is not a whole number of seconds"),
        ("timeout", "0", "is not a whole number of seconds"),
        ("exclude", "/", "excludes the whole root filesystem"),
        ("exclude", "xx:/tmp", "unknown pattern style xx:"),
        ("exclude", "re:(", "is not a valid regular expression"),
        ("bogus", "1", "unknown key user.incus-borg.bogus"),
    ],
)
def test_bad_keys_are_refused_naming_instance_key_and_source(
    key: str, value: str, expected: str
) -> None:
    with pytest.raises(UserError) as caught:
        resolve({}, [("backup-db", {K + key: value})])
    message = str(caught.value)
    assert message.startswith("instance default/c1: ")
    assert f"{K}{key}" in message and "(set on the profile backup-db)" in message
    assert expected in message


def test_unknown_key_lists_the_keys() -> None:
    with pytest.raises(UserError, match=r"the keys are user\.incus-borg\.mode, user\.incus-borg"):
        resolve({K + "prefix": "1"})


def test_volume_keys() -> None:
    fs = {"config": {K + "mode": "skip", K + "exclude": "/cache/*"}, "content_type": "filesystem"}
    chosen = policy.volume_policy("default/default/v", fs, "auto", None)
    assert (chosen.mode, chosen.mode_source, chosen.excludes) == ("skip", "volume", ["/cache/*"])
    for raw, key in [
        ({"config": {K + "pre": "true"}, "content_type": "filesystem"}, "pre"),
        ({"config": {K + "exclude": "/x"}, "content_type": "block"}, "exclude"),
    ]:
        with pytest.raises(UserError, match=f"volume default/default/v: unknown key {K}{key}"):
            policy.volume_policy("default/default/v", raw, "auto", None)


def test_excludes_are_split_and_trimmed() -> None:
    chosen = resolve({K + "exclude": " /var/cache/* , /tmp/*.tmp,,"})
    assert chosen.excludes == ["/var/cache/*", "/tmp/*.tmp"]


def test_effective_mode_keeps_skip() -> None:
    assert plan.effective_mode("skip", "dir", False) == "skip"
    assert plan.effective_mode("auto", "btrfs", True) == "snapshot"
    assert plan.effective_mode("stop", "dir", False) == "idle"


# --- patterns -----------------------------------------------------------------------------


def item(excludes: list[str], snapshots: list[str], kind: str = "instance") -> Item:
    path = "instances/default/c1" if kind == "instance" else "volumes/default/default/v1"
    return Item(kind, "default", "c1", "default", "dir", "container", snapshots, "Running",
                "freeze", path, excludes=excludes)  # fmt: skip


def test_patterns_cover_the_data_and_every_snapshot() -> None:
    got = policy.item_excludes(item(["/var/cache/*", "sh:**/*.log"], ["s1"]))
    root, snap = "instances/default/c1/backup/container/rootfs", "instances/default/c1/backup"
    assert got == [
        f"fm:{root}/var/cache/*",
        f"sh:{root}/**/*.log",
        f"fm:{snap}/snapshots/s1/rootfs/var/cache/*",
        f"sh:{snap}/snapshots/s1/rootfs/**/*.log",
    ]


def test_volume_patterns_are_relative_to_its_top() -> None:
    got = policy.item_excludes(item(["pp:/cache"], ["v1"], kind="volume"))
    assert got == [
        "pp:volumes/default/default/v1/backup/volume/cache",
        "pp:volumes/default/default/v1/backup/volume-snapshots/v1/cache",
    ]


def test_hook_mode_patterns_name_the_staging_tree() -> None:
    got = policy.item_excludes(item(["/tmp/*"], []), "/var/lib/incus-borg/staging")
    assert got == [
        "fm:var/lib/incus-borg/staging/instances/default/c1/backup/container/rootfs/tmp/*"
    ]


def test_wildcards_in_names_are_literal() -> None:
    assert policy.borg_excludes(["/x"], ["a/snap*[1]?"]) == ["fm:a/snap[*][[]1][?]/x"]


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("re:\\.log$", "R/var/log/a.log", True),
        ("re:\\.log$", "R/var/log/a.txt", False),
        ("re:^/var/log", "R/var/log/a", True),
        ("re:^var/log", "R/var/log/a", True),
        ("re:^var/log", "R/srv/var/log/a", False),
    ],
)
def test_regex_patterns_are_rooted(pattern: str, path: str, matches: bool) -> None:
    (rooted,) = policy.borg_excludes([pattern], ["R"])
    assert bool(re.search(rooted.removeprefix("re:"), path)) is matches
