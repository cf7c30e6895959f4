"""Configuration: the one schema (dataclasses with a description per key), loading and checks.

Every key, its type, default and description is declared once below; validation, the
generated sample (`incus-borg config generate`) and the docs' reference page all read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import UserError

DEFAULT_CONFIG_PATH = Path("/etc/incus-borg/config.yaml")
CONFIG_ENV = "INCUS_BORG_CONFIG"

Mode = Literal["auto", "snapshot", "freeze", "stop", "none", "export"]
Encryption = Literal[
    "repokey-blake2", "repokey", "keyfile-blake2", "keyfile", "authenticated-blake2", "none"
]
Outcome = Literal["success", "warning", "failure"]
HookHold = Literal["just-in-time", "whole-run"]
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DURATION = re.compile(r"(\d+(\.\d+)?[smhdw])+")


def key(default: Any, doc: str, *, example: Any = None) -> Any:
    """Declare a schema key: its default, one-line description and an optional sample value."""
    meta = {"doc": doc, "example": example}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Retention:
    """How many archives `prune` keeps, per period."""

    keep_daily: int = key(7, "Daily archives to keep.")
    keep_weekly: int = key(4, "Weekly archives to keep.")
    keep_monthly: int = key(6, "Monthly archives to keep.")


@dataclass(frozen=True)
class Repository:
    """One Borg repository that every backup goes to."""

    path: str = key(
        "/var/backups/incus-borg", "Borg repository: a local path or ssh://user@host:port/path."
    )
    label: str = key("", "Short name used by --repository and in messages (default: the path).")
    encryption: Encryption | None = key(
        None,
        "Borg encryption mode for `init`: repokey-blake2 when a passphrase is configured; "
        "'none' must be set explicitly.",
    )
    encryption_passphrase: str | None = key(
        None, "This repository's passphrase, when it differs from the global one."
    )
    encryption_passcommand: str | None = key(
        None, "Command printing this repository's passphrase (run without a shell)."
    )
    ssh_command: str | None = key(
        None,
        "SSH command for an ssh:// repository (BORG_RSH), with its own key.",
        example="ssh -i /root/.ssh/incus-borg-offsite",
    )
    remote_path: str | None = key(None, "The borg command on the remote host (--remote-path).")
    upload_ratelimit: int | None = key(None, "Upload limit in kiB/s (--upload-ratelimit).")
    lock_wait: int | None = key(None, "Seconds to wait for the repository's lock (--lock-wait).")
    append_only: bool = key(
        False,
        "The server serves this repository append-only (borg serve --append-only): deleting "
        "archives frees no space until the server's owner compacts it.",
    )
    retention: Retention | None = key(
        None, "This repository's retention, when it differs from the global one."
    )
    max_age: str | None = key(
        None,
        "This repository's max_age, when it differs from the global one.",
        example="8d",
    )

    @property
    def name(self) -> str:
        """The label, or the path when no label is set."""
        return self.label or self.path


@dataclass(frozen=True)
class IncusSettings:
    """Where Incus keeps its state and how its daemon is stopped and started."""

    dir: str = key("/var/lib/incus", "Incus directory, passed to every incus call as INCUS_DIR.")
    stop_command: str = key(
        "systemctl stop incus.service incus.socket",
        "Stops the Incus daemon only (instances keep running).",
    )
    start_command: str = key(
        "systemctl start incus.socket incus.service", "Starts the Incus daemon again."
    )
    subuid: str = key("/etc/subuid", "subuid file deciding uid shifting; backed up and restored.")
    subgid: str = key("/etc/subgid", "subgid file deciding gid shifting; backed up and restored.")


KeysFrom = Literal["everywhere", "profiles", "unrestricted-projects"]


@dataclass(frozen=True)
class PolicyRules:
    """What per-instance keys (`user.incus-borg.*`) may do, and whose are honoured."""

    keys_from: KeysFrom = key(
        "everywhere",
        "Where user.incus-borg.* keys are honoured: everywhere (instances, profiles, "
        "volumes), profiles (profiles only: keys on instances and volumes are ignored), or "
        "unrestricted-projects (keys on anything in a project with restricted=true are "
        "ignored, and so are that project's own profiles'). Ignored keys are named in the "
        "output and change nothing.",
    )
    max_timeout: int = key(
        3600,
        "Longest user.incus-borg.timeout (seconds) an instance may ask for; a larger one is "
        "clamped to this, and the output says so.",
    )


@dataclass(frozen=True)
class Group:
    """A consistency group: instances captured at one moment (see also the
    user.incus-borg.group key)."""

    name: str = key("", "The group's name: letters, digits, '.', '_' and '-'.", example="shop")
    instances: list[str] = key(
        [],
        "Its instances, as name (default project) or project/name; they may be in "
        "different projects.",
        example=["default/web", "default/db"],
    )

    @property
    def refs(self) -> list[str]:
        """Its instances as PROJECT/NAME."""
        return [ref if "/" in ref else f"default/{ref}" for ref in self.instances]


@dataclass(frozen=True)
class Notify:
    """Who hears how runs went: healthchecks-style URLs and Apprise URLs."""

    start_url: str | None = key(
        None,
        "Pinged (POST) when a backup or `hook pre` starts (healthchecks-style).",
        example="https://hc-ping.com/UUID/start",
    )
    success_url: str | None = key(
        None,
        "Pinged (POST, the log's last lines as body) when a backup or `hook post` ends and "
        "is not notified as failing.",
        example="https://hc-ping.com/UUID",
    )
    failure_url: str | None = key(
        None,
        "Pinged (POST, the log's last lines as body) when a backup or `hook post` fails, or "
        "warns while `when` lists warning.",
        example="https://hc-ping.com/UUID/fail",
    )
    apprise: list[str] = key(
        [],
        "Apprise URLs (mailto://, ntfys://, matrixs://, slack://, json://, ...) told when "
        "backup, hook post, prune or check ends as `when` lists; needs "
        "`pip install 'incus-borg[notify]'`.",
    )
    when: list[Outcome] = key(
        ["failure", "warning"],
        "Outcomes that notify: failure (exit 2), warning (exit 1), success (exit 0).",
    )
    timeout: int = key(
        10,
        "Seconds all of a command's notifications may take; one not delivered in time is a "
        "warning.",
    )


@dataclass(frozen=True)
class Config:
    """The whole configuration file."""

    repositories: list[Repository] = key(
        [Repository(label="local")], "One or more Borg repositories; each backup goes to every one."
    )
    encryption_passphrase: str | None = key(
        None,
        "Passphrase of the repositories (or use encryption_passcommand, or BORG_PASSPHRASE "
        "in the environment).",
        example="change me",
    )
    encryption_passcommand: str | None = key(
        None, "Command printing the passphrase, run without a shell.", example="cat /root/pass"
    )
    incus: IncusSettings = key(IncusSettings, "The Incus server to back up.")
    staging_dir: str = key(
        "/var/lib/incus-borg/staging",
        "Where a run lays out metadata and stable mount points: a new or empty directory, "
        "which incus-borg marks as its own (.incus-borg-staging); it refuses any other.",
    )
    mode: Mode = key(
        "auto",
        "How instances are quiesced: auto, snapshot, freeze, stop or none; export reads every "
        "instance and volume through Incus's own backup stream instead of in place.",
    )
    quiesce_daemon: bool = key(
        True,
        "Stop the daemon for a moment to copy its database exactly; false keeps the API up "
        "and backs up the SQL dumps only (then `restore server` has no exact database).",
    )
    max_window: int = key(
        120,
        "Longest time (seconds) an instance may stay frozen or stopped while it is read; a "
        "repository whose borg holds it up longer is skipped for the run with a warning.",
    )
    stall_timeout: int = key(
        300,
        "Seconds a repository's borg may make no progress at all before it is stopped and the "
        "repository skipped for the run (at least lock_wait plus a minute).",
    )
    hook_hold: HookHold = key(
        "just-in-time",
        "How `hook pre` quiesces for another program's Borg: just-in-time leaves a gate "
        "keeper that quiesces each instance only while Borg reads it (borgmatic, any Borg); "
        "whole-run holds everything until `hook post` (restic, which reads files in its own "
        "order). `hook pre --hold` overrides it.",
    )
    keeper_lifetime: str = key(
        "24h",
        "Longest life of the gate keeper `hook pre` leaves: it releases everything and ends "
        "by itself after this long (s, m, h, d or w), or once the program that ran `hook pre` "
        "is gone.",
    )
    quiesce_per_repository: bool = key(
        False,
        "Quiesce each instance once per repository, the repositories read one after another, "
        "instead of once for all repositories read side by side: shorter windows when one "
        "repository is slow; each repository still holds a consistent state.",
    )
    archive_name_format: str = key(
        "{member}-{now:%Y-%m-%dT%H:%M:%S}",
        "Name of each run's archive: {now} or {utcnow} (optionally {now:strftime format}), "
        "{hostname}, {fqdn} and {member} are replaced; no '/', '@' or '::'. {member} is the "
        "cluster member's name, or the hostname when not clustered; on a cluster a format "
        "without {member} gets '-{member}' appended, so that members never collide.",
    )
    instances: list[str] = key(
        [], "Instances to back up, as name or project/name; empty means all, in all projects."
    )
    groups: list[Group] = key(
        [],
        "Consistency groups: each group's instances are captured at one moment (frozen, "
        "snapshotted and thawed together), and `restore group` brings them back together.",
    )
    policy: PolicyRules = key(
        PolicyRules, "What per-instance keys (user.incus-borg.*) may do, and whose count."
    )
    retention: Retention = key(Retention, "How many archives to keep per period when pruning.")
    max_age: str = key(
        "26h",
        "How old an instance's newest run in a repository may be before `status`, the "
        "metrics and the report call it STALE: a number with s, m, h, d or w (26h, 90m, 8d).",
    )
    metrics_file: str | None = key(
        None,
        "Prometheus node-exporter textfile that backup, hook post, prune and check rewrite "
        "atomically.",
        example="/var/lib/prometheus/node-exporter/incus-borg.prom",
    )
    notify: Notify = key(Notify, "Notifications when runs start and end.")

    def select_repositories(self, label: str | None) -> list[Repository]:
        """All repositories, or the one whose label (or path) is `label`."""
        if label is None:
            return list(self.repositories)
        for repo in self.repositories:
            if label in (repo.label, repo.path):
                return [repo]
        known = ", ".join(r.name for r in self.repositories)
        raise UserError(f"no repository labelled {label!r}: use one of {known}")


def resolve_path(option: str | None) -> tuple[Path | None, bool]:
    """Which file to read: -c, then $INCUS_BORG_CONFIG, then the default path if it exists.

    Returns the path (None for built-in defaults) and whether it was asked for explicitly.
    """
    if option:
        return Path(option), True
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV]), True
    if DEFAULT_CONFIG_PATH.exists():
        return DEFAULT_CONFIG_PATH, True
    return None, False


def load(option: str | None) -> tuple[Config, Path | None]:
    """Read and validate the configuration chosen by `resolve_path`; returns it and the file
    it came from (None for the built-in defaults)."""
    path, _ = resolve_path(option)
    if path is None:
        return Config(), None
    return parse(read_text(path), str(path)), path


def read_text(path: Path) -> str:
    """The file's text, or a UserError saying why it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"config file {path} does not exist: create it with "
            f"`incus-borg config generate > {path}`"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(f"cannot read config file {path}: {reason}") from None


def parse(text: str, source: str) -> Config:
    """Parse YAML text into a validated Config; `source` names the file in messages."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"config {source}: invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    config = typing.cast(Config, _build(Config, data, "", source))
    names = [repo.name for repo in config.repositories]
    if not names:
        raise UserError(f"config {source}: 'repositories' must list at least one repository")
    if len(set(names)) != len(names):
        raise UserError(f"config {source}: repository labels must be unique, got {names}")
    if config.policy.max_timeout < 1:
        raise UserError(
            f"config {source}: 'policy.max_timeout' must be at least 1 (seconds), got "
            f"{config.policy.max_timeout}"
        )
    _check_groups(config.groups, source)
    ages: list[tuple[str, str | None]] = [("max_age", config.max_age)]
    ages += [("keeper_lifetime", config.keeper_lifetime)]
    ages += [(f"repositories[{i}].max_age", r.max_age) for i, r in enumerate(config.repositories)]
    for where, age in ages:
        if age is not None and parse_duration(age) is None:
            raise UserError(
                f"config {source}: '{where}' must be a number with s, m, h, d or w "
                f"(such as 26h, 90m or 8d), got {age!r}"
            )
    return config


GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
GROUP_RULE = "letters, digits, '.', '_' and '-', at most 63, starting with a letter or digit"


def _check_groups(groups: list[Group], source: str) -> None:
    """Each group named well and once, with instances, none of them in two groups."""
    seen: dict[str, str] = {}
    for i, group in enumerate(groups):
        where = f"config {source}: 'groups[{i}]'"
        if not GROUP_NAME.fullmatch(group.name):
            raise UserError(f"{where}: name {group.name!r} is not a group name: {GROUP_RULE}")
        if group.name in [g.name for g in groups[:i]]:
            raise UserError(f"{where}: group {group.name} is named twice: merge them")
        if not group.instances:
            raise UserError(f"{where}: group {group.name} lists no instances: add them")
        for full in group.refs:
            if seen.get(full) == group.name:
                raise UserError(f"{where}: instance {full} is listed twice in group {group.name}")
            if full in seen:
                raise UserError(
                    f"{where}: instance {full} is in groups {seen[full]} and {group.name}: "
                    "an instance can be in one group only"
                )
            seen[full] = group.name


def parse_duration(text: str) -> float | None:
    """Seconds in a duration such as `26h`, `90m`, `8d`, `1w`, `45s` or `1d12h`; None when
    the text is not one."""
    compact = re.sub(r"\s+", "", text.lower())
    if not DURATION.fullmatch(compact):
        return None
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", compact)
    return sum(float(number) * DURATION_UNITS[unit] for number, unit in parts)


def _type_name(tp: Any) -> str:
    """How a schema type is named in messages and docs."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or empty)"
    if origin is list:
        item = typing.get_args(tp)[0]
        return "a list of " + ("mappings" if dataclasses.is_dataclass(item) else "strings")
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {str: "a string", int: "an integer", bool: "true or false"}.get(tp, str(tp))


def _build(tp: Any, value: Any, where: str, source: str) -> Any:
    """Check `value` against the schema type `tp` and convert it; `where` is the key path."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _build(inner, value, where, source)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UserError(f"config {source}: '{where}' must be {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _wrong_type(tp, value, where, source)
        (item,) = typing.get_args(tp)
        return [_build(item, v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build_mapping(typing.cast(type, tp), value, where, source)
    # bool is a subclass of int: do not accept true where a number is expected.
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise _wrong_type(tp, value, where, source)
    return value


def _build_mapping(cls: type, value: Any, where: str, source: str) -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys."""
    if not isinstance(value, dict):
        raise _wrong_type(cls, value, where, source)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for name in value:
        if name not in known:
            place = f" under '{where}'" if where else ""
            raise UserError(
                f"config {source}: unknown key '{name}'{place} (known keys: {', '.join(known)})"
            )
    kwargs = {
        name: _build(hints[name], value[name], f"{where}.{name}" if where else name, source)
        for name in known
        if name in value
    }
    return cls(**kwargs)


def _wrong_type(tp: Any, value: Any, where: str, source: str) -> UserError:
    got = "empty" if value is None else type(value).__name__
    return UserError(f"config {source}: '{where}' must be {_type_name(tp)}, got {got}")


def sample() -> str:
    """A commented sample configuration built from the schema."""
    lines = ["# incus-borg configuration (every key is optional; shown with its default)."]
    _sample_lines(Config, Config(), "", lines)
    return "\n".join(lines) + "\n"


def _dump(value: Any) -> str:
    """One YAML value on one line."""
    value = json.loads(json.dumps(value, default=dataclasses.asdict))
    text = yaml.safe_dump(value, default_flow_style=True, width=1000)
    return text.removesuffix("...\n").strip()


def _sample_lines(cls: type, instance: Any, indent: str, lines: list[str]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = getattr(instance, f.name)
        if not indent:
            lines.append("")
        lines.append(f"{indent}# {f.metadata['doc']}")
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{indent}{f.name}:")
            _sample_lines(typing.cast(type, tp), default, indent + "  ", lines)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            item_cls = typing.get_args(tp)[0]
            lines.append(f"{indent}{f.name}:{'' if default else ' []'}")
            for item in default:
                item_lines: list[str] = []
                _sample_lines(item_cls, item, indent + "  ", item_lines)
                first = next(i for i, line in enumerate(item_lines) if line.lstrip()[0] != "#")
                item_lines[first] = indent + "  - " + item_lines[first].lstrip()
                lines.extend(
                    line if i <= first else indent + "  " + line
                    for i, line in enumerate(item_lines)
                )
        elif default is None:
            example = f.metadata["example"]
            shown = f" {_dump(example)}" if example is not None else ""
            lines.append(f"{indent}# {f.name}:{shown}")
        else:
            lines.append(f"{indent}{f.name}: {_dump(default)}")


def reference() -> str:
    """The configuration reference as a Markdown table, for docs/reference/configuration.md."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            name = prefix + f.name
            default = getattr(defaults, f.name)
            shown = "" if default is None else f"`{_dump(default)}`"
            if dataclasses.is_dataclass(tp):
                shown = ""
            rows.append(f"| `{name}` | {_type_name(tp)} | {shown} | {f.metadata['doc']} |")
            if dataclasses.is_dataclass(tp):
                walk(typing.cast(type, tp), name + ".")
            elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
                walk(typing.get_args(tp)[0], name + "[].")

    walk(Config, "")
    return "\n".join(rows) + "\n"
