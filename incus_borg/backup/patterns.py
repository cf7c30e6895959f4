"""Exclude patterns of a per-instance policy, confined to the instance's own root filesystem.

A `user.incus-borg.exclude` key is written by whoever controls the instance (on a shared
server, a tenant), so its patterns must never reach beyond that instance's root: not
another instance, not the server's state (database, dumps, definitions, subuid/subgid),
and not the root itself. Confinement comes in three layers:

- `problem` refuses a pattern that names a `..` component, that would exclude the whole
  root, or that cannot be wrapped (an invalid regular expression);
- `rooted` writes each pattern below its root the way Borg reads it: fm/sh/pp/pf paths are
  prefixed by the root (wildcards in the root's names made literal), regular expressions are
  anchored as `^ROOT/(?:...)`, so that no alternation or construct can match elsewhere;
- `confined` checks every pattern that reaches Borg, parsed as Borg parses it (its style
  prefix, then `os.path.normpath` for path styles), against the root and a set of paths
  outside it: a pattern that fails is never passed on.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

from ..errors import UserError

# Borg's pattern styles (`borg help patterns`); a pattern without one is `fm:`, as for
# `borg create --exclude`.
STYLES = ("fm", "sh", "re", "pp", "pf")
WILDCARD_STYLES = ("fm", "sh")
# Leading global flags of a regular expression, such as `(?s)` (Python allows them only at
# the start); they become the flags of the group that confines the expression.
_LEADING_FLAGS = re.compile(r"\(\?([aiLmsux]+)\)")
# What stands outside every root, besides the root itself and its siblings (see `outside`).
_SERVER_PATHS = (
    "manifest.json",
    "host/subuid",
    "host/subgid",
    "database/local.db",
    "dumps/global.sql",
    "dumps/local.sql",
    "definitions/instances.yaml",
    "incus/server.crt",
    "instances/default/other/backup/container/rootfs/root/data",
    "volumes/default/default/other/backup/volume/data",
)


def borg_style(pattern: str) -> tuple[str, str]:
    """A pattern's style and the rest, as Borg splits them (two letters or digits and a
    colon); `fm` when it names none."""
    if len(pattern) > 2 and pattern[2] == ":" and pattern[:2].isalnum():
        return pattern[:2], pattern[3:]
    return "fm", pattern


def problem(pattern: str) -> str | None:
    """What makes an exclude pattern (relative to a root filesystem) unusable, or None."""
    style, path = borg_style(pattern)
    if style not in STYLES:
        return f"has the unknown pattern style {style}: (use {', '.join(STYLES)})"
    if style == "re":
        return _regex_problem(path)
    if ".." in path.split("/"):
        return "has a '..' component: a pattern cannot leave the root filesystem it applies to"
    relative = os.path.normpath("/" + path).strip("/")
    wildcards = set("*/") if style in WILDCARD_STYLES else set()
    if not relative or relative == "." or set(relative) <= wildcards:
        return "excludes the whole root filesystem: set mode=skip instead"
    return None


def _regex_problem(expression: str) -> str | None:
    try:
        re.compile(expression)
    except re.error as exc:
        return f"is not a valid regular expression ({exc})"
    try:
        re.compile(_confined_regex(expression, "root"))
    except re.error as exc:
        return f"cannot be confined to the root filesystem ({exc})"
    return None


def rooted(pattern: str, root: str) -> str:
    """The Borg pattern that applies `pattern` (checked with `problem`) below `root` (an
    archive path such as `instances/P/N/backup/container/rootfs`), checked with `confined`."""
    root = root.strip("/")
    style, path = borg_style(pattern)
    if style == "re":
        written = f"re:{_confined_regex(path, root)}"
    else:
        written = f"{style}:{literal_root(style, root)}/{path.lstrip('/')}"
    if not confined(written, root):
        raise UserError(
            f"exclude pattern {pattern!r} would reach outside {root}: it is not passed to borg"
        )
    return written


def _confined_regex(expression: str, root: str) -> str:
    """`expression` (matched against the path below the root, without its leading `/`; `^`
    anchors it at the root) as a regular expression for the whole archive path that can
    only match below `root`."""
    flags = ""
    while match := _LEADING_FLAGS.match(expression):
        flags += match.group(1)
        expression = expression[match.end() :]
    if expression.startswith("^"):
        inner = expression[1:].removeprefix("/")
    else:
        inner = f".*?(?:{expression})"
    return f"^{re.escape(root)}/(?{flags}:{inner})"


def literal_root(style: str, root: str) -> str:
    """The root as a pattern of `style` writes it: its names literal, never wildcards."""
    return re.sub(r"([*?\[])", r"[\1]", root) if style in WILDCARD_STYLES else root


def outside(root: str) -> list[str]:
    """Paths that no pattern rooted at `root` may match: the root itself, names beside it and
    beside each of its parents, and the server's own state."""
    paths = [root, root + "x", root + "-x/data"]
    parent = root
    while "/" in parent:
        parent = parent.rsplit("/", 1)[0]
        paths += [parent, f"{parent}/backup.yaml", f"{parent}/x/data"]
    return paths + [p for p in _SERVER_PATHS if not p.startswith(root + "/")]


def confined(pattern: str, root: str) -> bool:
    """Whether a Borg exclude pattern, read as Borg reads it, matches nothing outside
    `root` (nor the root itself)."""
    style, rest = borg_style(pattern)
    if style == "re":
        prefix = f"^{re.escape(root)}/(?"
        try:
            regex = re.compile(rest)
        except re.error:
            return False
        return rest.startswith(prefix) and not any(regex.search(p) for p in outside(root))
    if style not in STYLES:
        return False
    normal = os.path.normpath(rest).lstrip("/")
    return normal.startswith(literal_root(style, root) + "/") and ".." not in normal.split("/")


def beyond(excluded: Iterable[str], roots: Sequence[str], own: str) -> list[str]:
    """What a run excluded that no instance's pattern may: every excluded archive path that
    lies neither strictly below one of `roots` (the root filesystems that have exclude
    patterns) nor below `own` (what incus-borg itself leaves out, such as the Incus
    directory's transient files)."""
    inside = tuple(f"{root.strip('/')}/" for root in [*roots, own])
    return [path for path in excluded if not path.lstrip("/").startswith(inside)]
