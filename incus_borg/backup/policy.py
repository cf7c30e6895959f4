"""Per-instance backup policy: the `user.incus-borg.*` keys of each instance (from its
expanded config, so a profile's keys apply to every instance using it) and of each custom
volume, checked before anything is quiesced, each with where it came from.

Where a key came from: "instance" when it is in the instance's own config, else "profile
NAME" for the last profile (in the instance's profile order) that sets it, "volume" for a
custom volume's config; the mode may also come from the "configuration" or, overriding all
of them for one run, the "command line".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..manifest import Item

PREFIX = "user.incus-borg."
MODES = ("auto", "snapshot", "freeze", "stop", "none", "skip")
INSTANCE_KEYS = ("mode", "exclude", "pre", "post", "timeout")
VOLUME_KEYS = ("mode", "exclude")  # custom volumes run no commands
DEFAULT_TIMEOUT = 300  # seconds a pre or post command may take
# Borg's pattern styles (`borg help patterns`); a pattern without one is `fm:`, as for
# `borg create --exclude`.
STYLES = ("fm", "sh", "re", "pp", "pf")
# Where a setting came from (besides "profile NAME").
CONFIGURATION, COMMAND_LINE = "configuration", "command line"
INSTANCE, VOLUME = "instance", "volume"


@dataclass(frozen=True)
class Setting:
    """One key's value and where it came from."""

    value: str
    source: str


@dataclass
class Policy:
    """What the keys ask for one instance or volume."""

    mode: str  # auto, snapshot, freeze, stop, none or skip
    mode_source: str
    excludes: list[str] = field(default_factory=list)
    pre: str | None = None
    post: str | None = None
    timeout: int = DEFAULT_TIMEOUT


def profile_source(name: str) -> str:
    """The source of a key set by a profile."""
    return f"profile {name}"


def settings(
    expanded: dict[str, str], own: dict[str, str], profiles: Sequence[tuple[str, dict[str, Any]]]
) -> dict[str, Setting]:
    """The `user.incus-borg.*` keys of an instance (short names), each with its source:
    the instance's own config, else the last of `profiles` ((name, config), in the
    instance's order) that sets it."""
    found = {}
    for key, value in expanded.items():
        if not key.startswith(PREFIX):
            continue
        source = INSTANCE
        if key not in own:
            setters = [name for name, config in profiles if key in config]
            source = profile_source(setters[-1]) if setters else INSTANCE
        found[key.removeprefix(PREFIX)] = Setting(str(value), source)
    return found


def resolve(
    what: str,
    keys: dict[str, Setting],
    allowed: Sequence[str],
    configured: str,
    command_line: str | None,
) -> Policy:
    """Check the keys of one instance or volume (`what`, as "instance P/NAME") and resolve
    its policy: `command_line` (--mode) overrides the keys, which override `configured`."""
    for key, setting in keys.items():
        if key not in allowed:
            raise UserError(
                f"{what}: unknown key {PREFIX}{key} (set on the {setting.source}): "
                f"the keys are {', '.join(PREFIX + k for k in allowed)}"
            )
    policy = Policy(configured, CONFIGURATION)
    if "mode" in keys:
        policy.mode = _check(what, "mode", keys["mode"], MODES)
        policy.mode_source = keys["mode"].source
    if command_line:
        policy.mode, policy.mode_source = command_line, COMMAND_LINE
    if "exclude" in keys:
        policy.excludes = _excludes(what, keys["exclude"])
    if "pre" in keys:
        policy.pre = keys["pre"].value
    if "post" in keys:
        policy.post = keys["post"].value
    if "timeout" in keys:
        policy.timeout = _timeout(what, keys["timeout"])
    return policy


def instance_policy(
    ref: str,
    raw: dict[str, Any],
    profiles: Sequence[tuple[str, dict[str, Any]]],
    configured: str,
    command_line: str | None,
) -> Policy:
    """The policy of one instance, as the API shows it (`raw`); `profiles` are its profiles'
    (name, config) in its order."""
    keys = settings(raw.get("expanded_config") or {}, raw.get("config") or {}, profiles)
    return resolve(f"instance {ref}", keys, INSTANCE_KEYS, configured, command_line)


def volume_policy(
    ref: str, raw: dict[str, Any], configured: str, command_line: str | None
) -> Policy:
    """The policy of one custom volume, from its own config (`exclude` on filesystem volumes
    only)."""
    keys = {
        k.removeprefix(PREFIX): Setting(str(v), VOLUME)
        for k, v in (raw.get("config") or {}).items()
        if k.startswith(PREFIX)
    }
    allowed = VOLUME_KEYS if raw.get("content_type") != "block" else ("mode",)
    return resolve(f"volume {ref}", keys, allowed, configured, command_line)


def _check(what: str, key: str, setting: Setting, allowed: Sequence[str]) -> str:
    if setting.value not in allowed:
        raise UserError(
            f"{what}: {PREFIX}{key}={setting.value!r} (set on the {setting.source}) is not "
            f"one of {', '.join(allowed)}"
        )
    return setting.value


def _timeout(what: str, setting: Setting) -> int:
    value = setting.value.strip()
    if not value.isdigit() or int(value) < 1:
        raise UserError(
            f"{what}: {PREFIX}timeout={setting.value!r} (set on the {setting.source}) is not "
            "a whole number of seconds of at least 1"
        )
    return int(value)


def _excludes(what: str, setting: Setting) -> list[str]:
    """The comma-separated patterns of an `exclude` key, each checked."""
    patterns = [p.strip() for p in setting.value.split(",") if p.strip()]
    for pattern in patterns:
        style, path = split_style(pattern)
        problem = None
        if style not in STYLES:
            problem = f"has the unknown pattern style {style}: (use {', '.join(STYLES)})"
        elif style != "re" and not path.strip("/"):
            problem = "excludes the whole root filesystem: set mode=skip instead"
        elif style == "re":
            problem = _regex_problem(path)
        if problem:
            raise UserError(
                f"{what}: {PREFIX}exclude pattern {pattern!r} (set on the {setting.source}) "
                f"{problem}"
            )
    return patterns


def _regex_problem(expression: str) -> str | None:
    try:
        re.compile(expression)
    except re.error as exc:
        return f"is not a valid regular expression ({exc})"
    return None


def split_style(pattern: str) -> tuple[str, str]:
    """A Borg pattern's style and its path part (`fm` when it names no style)."""
    match = re.match(r"([a-z]{2}):(.*)", pattern, re.S)
    return (match.group(1), match.group(2)) if match else ("fm", pattern)


# --- patterns for borg --------------------------------------------------------------------


def borg_excludes(patterns: Sequence[str], roots: Sequence[str]) -> list[str]:
    """Borg `--exclude` patterns that apply `patterns` (relative to a root filesystem) below
    each of `roots` (archive paths such as `instances/P/N/backup/container/rootfs`)."""
    return [_rooted(pattern, root.strip("/")) for root in roots for pattern in patterns]


def _rooted(pattern: str, root: str) -> str:
    style, path = split_style(pattern)
    if style == "re":
        if path.startswith("^"):  # anchored at the root filesystem
            rest = path[1:]
            return f"re:^{re.escape(root)}/{rest[1:] if rest.startswith('/') else rest}"
        return f"re:^{re.escape(root)}/.*?(?:{path})"
    if style in ("fm", "sh"):
        root = re.sub(r"([*?\[])", r"[\1]", root)  # names are literal, not wildcards
    return f"{style}:{root}/{path.lstrip('/')}"


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
