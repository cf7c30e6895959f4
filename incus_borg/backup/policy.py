"""Per-instance backup policy: the `user.incus-borg.*` keys of each instance (from its
expanded config, so a profile's keys apply to every instance using it) and of each custom
volume, checked before anything is quiesced, each with where it came from.

Where a key came from: "instance" when it is in the instance's own config, else "profile
NAME" for the last profile (in the instance's profile order) that sets it, "volume" for a
custom volume's config; the mode may also come from the "configuration" or, overriding all
of them for one run, the "command line".

The keys are written by whoever controls the instance (on a shared server, a tenant of a
restricted project), so none may reach beyond it: every value is checked (known keys and
modes, no control or invisible characters, a bounded length), exclude patterns are
confined to the instance's own root filesystem (see patterns.py), `pre` and `post` run
inside the instance only, a `group` gathers instances of the instance's own project only, a timeout is clamped to the configuration's `policy.max_timeout`,
and `policy.keys_from` says whose keys are honoured at all.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import GROUP_NAME, GROUP_RULE, PolicyRules
from ..errors import UserError
from ..manifest import Item
from . import patterns as patterns_

PREFIX = "user.incus-borg."
MODES = ("auto", "snapshot", "freeze", "stop", "none", "skip", "export")
INSTANCE_KEYS = ("mode", "exclude", "pre", "post", "timeout", "group")
VOLUME_KEYS = ("mode", "exclude")  # custom volumes run no commands
DEFAULT_TIMEOUT = 300  # seconds a pre or post command may take
MAX_VALUE = 4096  # characters a key's value may hold
# Unicode categories refused in a value: controls (newline, NUL, ...), invisible format
# characters (bidirectional overrides, zero-width spaces), surrogates, private use,
# unassigned, and line and paragraph separators.
REFUSED_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")
# Where a setting came from (besides "profile NAME").
CONFIGURATION, COMMAND_LINE = "configuration", "command line"
INSTANCE, VOLUME = "instance", "volume"


@dataclass(frozen=True)
class Setting:
    """One key's value, where it came from, and the project of what it was set on."""

    value: str
    source: str
    project: str = "default"


@dataclass
class Policy:
    """What the keys ask for one instance or volume, and what was said about them (keys
    ignored, a timeout clamped)."""

    mode: str  # auto, snapshot, freeze, stop, none or skip
    mode_source: str
    excludes: list[str] = field(default_factory=list)
    pre: str | None = None
    post: str | None = None
    timeout: int = DEFAULT_TIMEOUT
    group: str | None = None  # the consistency group it is in (its project's, by this name)
    group_source: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Trust:
    """Whose keys are honoured: the configuration's `policy` and the projects that Incus
    restricts (`restricted=true`)."""

    rules: PolicyRules = field(default_factory=PolicyRules)
    restricted: frozenset[str] = frozenset()

    def ignores(self, setting: Setting) -> str | None:
        """Why a key is not honoured, or None when it is."""
        keys_from = self.rules.keys_from
        if keys_from == "profiles" and not setting.source.startswith("profile "):
            return "policy.keys_from is profiles"
        if keys_from == "unrestricted-projects" and setting.project in self.restricted:
            return (
                f"policy.keys_from is unrestricted-projects and project {setting.project} "
                "is restricted"
            )
        return None


def profile_source(name: str) -> str:
    """The source of a key set by a profile."""
    return f"profile {name}"


def settings(
    expanded: dict[str, str],
    own: dict[str, str],
    profiles: Sequence[tuple[str, dict[str, Any]]],
    project: str = "default",
    profile_projects: dict[str, str] | None = None,
) -> dict[str, Setting]:
    """The `user.incus-borg.*` keys of an instance of `project` (short names), each with its
    source: the instance's own config, else the last of `profiles` ((name, config), in the
    instance's order) that sets it (`profile_projects`: the project each profile is in,
    when not the instance's)."""
    found = {}
    for key, value in expanded.items():
        if not key.startswith(PREFIX):
            continue
        source, where = INSTANCE, project
        if key not in own:
            setters = [name for name, config in profiles if key in config]
            if setters:
                source = profile_source(setters[-1])
                where = (profile_projects or {}).get(setters[-1], project)
        found[key.removeprefix(PREFIX)] = Setting(str(value), source, where)
    return found


def resolve(
    what: str,
    keys: dict[str, Setting],
    allowed: Sequence[str],
    configured: str,
    command_line: str | None,
    trust: Trust | None = None,
) -> Policy:
    """Check the keys of one instance or volume (`what`, as "instance P/NAME") and resolve
    its policy: `command_line` (--mode) overrides the keys, which override `configured`.
    Keys that `trust` does not honour are left out (and noted), unchecked: they change
    nothing, so they cannot stop a run either."""
    trust = trust or Trust()
    policy = Policy(configured, CONFIGURATION)
    honoured = {}
    for key, setting in keys.items():
        why = trust.ignores(setting)
        if why:
            policy.notes.append(
                f"{what}: {PREFIX}{key} (set on the {setting.source}) is ignored: {why}"
            )
        else:
            honoured[key] = setting
    for key, setting in honoured.items():
        if key not in allowed:
            raise UserError(
                f"{what}: unknown key {PREFIX}{plain(key)} (set on the {setting.source}): "
                f"the keys are {', '.join(PREFIX + k for k in allowed)}"
            )
        _check_text(what, key, setting)
    if "mode" in honoured:
        policy.mode = _check(what, "mode", honoured["mode"], MODES)
        policy.mode_source = honoured["mode"].source
    if command_line:
        policy.mode, policy.mode_source = command_line, COMMAND_LINE
    if "exclude" in honoured:
        policy.excludes = _excludes(what, honoured["exclude"])
    if "pre" in honoured:
        policy.pre = honoured["pre"].value
    if "post" in honoured:
        policy.post = honoured["post"].value
    if "group" in honoured:
        policy.group = _group(what, honoured["group"])
        policy.group_source = honoured["group"].source
    if "timeout" in honoured:
        policy.timeout = _timeout(what, honoured["timeout"], trust.rules.max_timeout, policy)
    return policy


def instance_policy(
    ref: str,
    raw: dict[str, Any],
    profiles: Sequence[tuple[str, dict[str, Any]]],
    configured: str,
    command_line: str | None,
    trust: Trust | None = None,
    profile_projects: dict[str, str] | None = None,
) -> Policy:
    """The policy of one instance, as the API shows it (`raw`); `profiles` are its profiles'
    (name, config) in its order, in `profile_projects` (name -> project) when not in the
    instance's own."""
    project = str(raw.get("project") or ref.split("/", 1)[0])
    keys = settings(
        raw.get("expanded_config") or {},
        raw.get("config") or {},
        profiles,
        project,
        profile_projects,
    )
    return resolve(f"instance {ref}", keys, INSTANCE_KEYS, configured, command_line, trust)


def volume_policy(
    ref: str,
    raw: dict[str, Any],
    configured: str,
    command_line: str | None,
    trust: Trust | None = None,
) -> Policy:
    """The policy of one custom volume, from its own config (`exclude` on filesystem volumes
    only)."""
    project = str(raw.get("project") or "default")
    keys = {
        k.removeprefix(PREFIX): Setting(str(v), VOLUME, project)
        for k, v in (raw.get("config") or {}).items()
        if k.startswith(PREFIX)
    }
    allowed = VOLUME_KEYS if raw.get("content_type") != "block" else ("mode",)
    return resolve(f"volume {ref}", keys, allowed, configured, command_line, trust)


def shown(value: str, limit: int = 60) -> str:
    """A value as messages quote it: escaped (no control character reaches a terminal or a
    log), and cut after `limit` characters."""
    cut = value if len(value) <= limit else value[:limit] + "..."
    return ascii(cut)


def plain(name: str) -> str:
    """A key's name as messages show it: as it is when printable ASCII, else escaped."""
    return name if name.isascii() and name.isprintable() and len(name) <= 60 else shown(name)


def _check_text(what: str, key: str, setting: Setting) -> None:
    """Refuse a value that is too long, or that holds control or invisible characters."""
    value = setting.value
    problem = None
    if len(value) > MAX_VALUE:
        problem = f"is {len(value)} characters long, more than {MAX_VALUE}"
    else:
        odd = next((c for c in value if unicodedata.category(c) in REFUSED_CATEGORIES), None)
        if odd is not None:
            name = unicodedata.name(odd, "")  # control characters have none
            kind = f"the invisible character {name}" if name else "a control character"
            problem = (
                f"holds {kind} (U+{ord(odd):04X}): write it on one line, with visible "
                "characters only"
            )
    if problem:
        raise UserError(
            f"{what}: {PREFIX}{key}={shown(value)} (set on the {setting.source}) {problem}"
        )


def _check(what: str, key: str, setting: Setting, allowed: Sequence[str]) -> str:
    if setting.value not in allowed:
        raise UserError(
            f"{what}: {PREFIX}{key}={shown(setting.value)} (set on the {setting.source}) is "
            f"not one of {', '.join(allowed)}"
        )
    return setting.value


def _timeout(what: str, setting: Setting, limit: int, policy: Policy) -> int:
    """A timeout key's seconds, clamped to `limit` (policy.max_timeout) with a note."""
    value = setting.value.strip()
    digits = value.lstrip("0")
    if not value.isascii() or not value.isdigit() or not digits:
        raise UserError(
            f"{what}: {PREFIX}timeout={shown(setting.value)} (set on the {setting.source}) "
            "is not a whole number of seconds of at least 1"
        )
    seconds = int(digits) if len(digits) <= 18 else limit + 1
    if seconds > limit:
        policy.notes.append(
            f"{what}: {PREFIX}timeout={shown(value, 20)} (set on the {setting.source}) is "
            f"more than policy.max_timeout: clamped to {limit} s"
        )
        return limit
    return seconds


def _group(what: str, setting: Setting) -> str:
    """A group key's name, checked."""
    if not GROUP_NAME.fullmatch(setting.value):
        raise UserError(
            f"{what}: {PREFIX}group={shown(setting.value)} (set on the {setting.source}) is not "
            f"a group name: {GROUP_RULE}"
        )
    return setting.value


def _excludes(what: str, setting: Setting) -> list[str]:
    """The comma-separated patterns of an `exclude` key, each checked."""
    patterns = [p.strip() for p in setting.value.split(",") if p.strip()]
    for pattern in patterns:
        problem = patterns_.problem(pattern)
        if problem:
            raise UserError(
                f"{what}: {PREFIX}exclude pattern {shown(pattern)} (set on the "
                f"{setting.source}) {problem}"
            )
    return patterns


# --- patterns for borg --------------------------------------------------------------------


def borg_excludes(patterns: Sequence[str], roots: Sequence[str]) -> list[str]:
    """Borg `--exclude` patterns that apply `patterns` (relative to a root filesystem) below
    each of `roots` (archive paths such as `instances/P/N/backup/container/rootfs`), each
    confined to its root."""
    return [patterns_.rooted(pattern, root) for root in roots for pattern in patterns]


def item_roots(kind: str, path: str, snapshots: Sequence[str]) -> list[str]:
    """Where an item's root filesystems are in the archive: an instance's (and each of its
    snapshots') `rootfs`, a filesystem volume's (and its snapshots') top directory."""
    if kind == "instance":
        return [f"{path}/backup/container/rootfs"] + [
            f"{path}/backup/snapshots/{snap}/rootfs" for snap in snapshots
        ]
    return [f"{path}/backup/volume"] + [f"{path}/backup/volume-snapshots/{s}" for s in snapshots]


def item_excludes(item: Item, stage_root: str = "") -> list[str]:
    """Borg `--exclude` patterns for an item's `excludes`, for archive paths relative to the
    staging tree, or (in hook mode) below the staging tree `stage_root`."""
    roots = item_roots(item.kind, item.path, item.snapshots)
    if stage_root:
        roots = [f"{stage_root.rstrip('/')}/{root}" for root in roots]
    return borg_excludes(item.excludes, roots)


def describe(item: Item) -> list[str]:
    """An item's policy beyond its mode, in words (for `backup --dry-run`)."""
    lines = []
    if item.excludes:
        lines.append(f"exclude: {', '.join(item.excludes)}")
    if (item.pre or item.post) and item.state != "Running":
        lines.append(f"pre and post: not run, the instance is {item.state.lower()}")
    elif item.pre or item.post:
        lines.append(f"pre: {item.pre or '-'}")
        lines.append(f"post: {item.post or '-'}")
        lines.append(f"timeout: {item.timeout} s each")
    return lines
