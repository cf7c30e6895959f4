"""Exclude patterns are confined to their instance's root filesystem, checked with Borg's
own pattern classes (as `borg create --exclude` parses and matches them)."""

from __future__ import annotations

import pytest
from borg.patterns import PatternMatcher, parse_exclude_pattern

from incus_borg.backup import patterns, policy
from incus_borg.errors import UserError

ROOT = "instances/default/c2/backup/container/rootfs"
SNAPSHOT_ROOT = "instances/default/c2/backup/snapshots/s*1/rootfs"
HOOK_ROOT = "var/lib/incus-borg/staging/" + ROOT
# Paths outside c2's root filesystem: another instance's data, the server's state, c2's own
# files beside its root (backup.yaml), the root itself and names that only start like it.
OUTSIDE = [
    "instances/default/c1/backup/container/rootfs/root/data",
    "instances/default/c1/backup/container/rootfs",
    "instances/default/c1/backup/index.yaml",
    "instances/default/c2/backup/container/backup.yaml",
    "instances/default/c2/backup/index.yaml",
    "instances/default/c2/backup/container/rootfsx/data",
    ROOT,
    "volumes/default/default/v1/backup/volume/data",
    "manifest.json",
    "database/local.db",
    "dumps/global.sql",
    "host/subuid",
    "host/subgid",
    "definitions/instances.yaml",
    "incus/server.crt",
    "instances",
    "x",
]
HOSTILE = [
    "../../../../../*",
    "sh:../../**",
    "re:^/x|.*",
    "re:(?s).*",
    "pp:../..",
    "re:.*",
    "re:^",
    "re:|",
    "re:x|^manifest.json",
    "re:(?m)^manifest",
    "re:(?i)x)|(.*",
    "re:[)]|.*",
    "re:\\Z|",
    "re:(?x) .* # )",
    "re:(?<=rootfs).*",
    "re:$",
    "re:(?:)",
    "re:(?s)(?m).*|x",
    "re:^/../../",
    "fm:*",
    "*",
    "sh:**",
    "sh:**/",
    "sh:/**/*",
    "pf:.",
    "pp:/",
    "./",
    "/./.",
    "sh:/./**",
    "fm:/x/../../y",
    "/x/..",
    "pf:/../c1/backup",
    "pp:x/../../../c1",
    "fm:[!a]*/../..",
    "xx:/tmp",
    "RE:.*",
    "Fm:*",
    "re:(",
    "re:(?L).*",
]


def borg_matches(pattern: str, path: str) -> bool:
    """Whether Borg excludes `path` (an archive path) with `--exclude PATTERN`."""
    matcher = PatternMatcher(fallback=True)
    matcher.add_inclexcl([parse_exclude_pattern(pattern)])
    return not matcher.match(path)


def rooted_or_refused(pattern: str, roots: list[str]) -> list[str] | None:
    """The patterns Borg gets for `pattern` below `roots`, or None when it is refused."""
    if patterns.problem(pattern) is not None:
        return None
    return policy.borg_excludes([pattern], roots)


@pytest.mark.parametrize("pattern", HOSTILE)
@pytest.mark.parametrize("root", [ROOT, SNAPSHOT_ROOT, HOOK_ROOT])
def test_no_rooted_pattern_matches_outside_its_root(pattern: str, root: str) -> None:
    written = rooted_or_refused(pattern, [root])
    if written is None:
        return
    outside = [p if root != HOOK_ROOT else "var/lib/incus-borg/staging/" + p for p in OUTSIDE]
    outside += patterns.outside(root)
    for borg_pattern in written:
        hits = [p for p in outside if borg_matches(borg_pattern, p)]
        assert not hits, (pattern, borg_pattern, hits)


@pytest.mark.parametrize(
    "pattern",
    ["../../../../../*", "sh:../../**", "pp:../..", "/x/..", "fm:/x/../../y", "pf:/../c1"],
)
def test_a_dotdot_component_is_refused(pattern: str) -> None:
    assert "'..' component" in str(patterns.problem(pattern))


@pytest.mark.parametrize("pattern", ["/", "*", "sh:**", "sh:**/", "pf:.", "pp:/", "./", "/./."])
def test_a_pattern_of_the_whole_root_is_refused(pattern: str) -> None:
    assert "excludes the whole root filesystem" in str(patterns.problem(pattern))


@pytest.mark.parametrize("pattern", ["re:(", "re:(?i)x)|(.*", "re:(?L).*", "RE:.*", "xx:/x"])
def test_unusable_patterns_are_refused(pattern: str) -> None:
    assert patterns.problem(pattern) is not None


@pytest.mark.parametrize(
    ("pattern", "inside", "matches"),
    [
        ("/var/cache/*", "var/cache/apt/pkg.bin", True),
        ("/var/cache/*", "var/lib/x", False),
        ("sh:**/*.log", "var/log/a.log", True),
        ("pp:/tmp", "tmp/a/b", True),
        ("pf:/tmp/a", "tmp/a", True),
        ("re:\\.tmp$", "tmp/x.tmp", True),
        ("re:^/x|.*", "anything/at/all", True),
        ("re:(?s).*", "etc/passwd", True),
        ("re:^var/log", "srv/var/log/a", False),
    ],
)
def test_rooted_patterns_still_exclude_what_they_name(
    pattern: str, inside: str, matches: bool
) -> None:
    (written,) = policy.borg_excludes([pattern], [ROOT])
    assert borg_matches(written, f"{ROOT}/{inside}") is matches


def test_a_pattern_that_would_escape_is_never_passed_on() -> None:
    assert not patterns.confined("fm:instances/default/c2/../c1/*", ROOT)
    assert not patterns.confined("re:^instances/default/c2/backup/container/rootfs/x|.*", ROOT)
    assert not patterns.confined("re:.*", ROOT)
    assert not patterns.confined("fm:*", ROOT)
    assert patterns.confined(f"fm:{ROOT}/x", ROOT)
    with pytest.raises(UserError, match="would reach outside"):
        patterns.rooted("fm:x", "a/*/b/..")
