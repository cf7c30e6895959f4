"""The Prometheus metrics file: node-exporter's textfile format, written by prometheus_client
(which writes a temporary file beside it and renames it over the old one, so a reader never
sees half a file), from the local index and the states of the live instances.

An instance or volume is named by the labels `kind`, `project` and `name` (and `pool` for a
volume): Prometheus gives every scraped series its own `instance` label (the exporter), so a
textfile metric labelled `instance` would be renamed `exported_instance`.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from ..errors import UserError
from . import coverage
from .coverage import Standing
from .index import Index, Run

PREFIX = "incus_borg_"
ITEM_LABELS = ("kind", "project", "name", "pool", "member")


def write(path: str, index: Index, standings: list[Standing] | None, member: str) -> None:
    """Replace the metrics file at `path`; `standings` are the live instances' states
    (None when the server could not be asked: then every instance the index knows)."""
    try:
        write_to_textfile(path, build(index, standings, member))
    except OSError as exc:
        raise UserError(f"cannot write metrics_file {path}: {exc.strerror or exc}") from None


def build(index: Index, standings: list[Standing] | None, member: str) -> CollectorRegistry:
    """Every metric, in a registry of its own."""
    registry = CollectorRegistry()
    items = standings if standings is not None else _known(index)
    _per_item(registry, index, items)
    _per_repository(registry, index.ordered())
    _per_command(registry, index, member)
    if standings is not None:
        counted = Gauge(
            PREFIX + "items",
            "Instances and custom volumes on the server in each status state.",
            ["kind", "state", "member"],
            registry=registry,
        )
        for kind in ("instance", "volume"):
            found = coverage.counts(s for s in standings if s.kind == kind)
            for state, count in found.items():
                counted.labels(kind, state, member).set(count)
    return registry


def _known(index: Index) -> list[Standing]:
    """Every instance and volume some run recorded, when the server cannot be asked."""
    seen: dict[tuple[str, str], Standing] = {}
    for run in index.ordered():
        for e in run.items:
            seen[e.key] = Standing(e.kind, e.project, e.name, e.pool, run.member, "")
    return list(seen.values())


def _labels(item: Standing) -> list[str]:
    pool = item.pool if item.kind == "volume" else ""
    return [item.kind, item.project, item.name, pool, item.member]


def _per_item(registry: CollectorRegistry, index: Index, items: Iterable[Standing]) -> None:
    success = Gauge(
        PREFIX + "last_success_timestamp_seconds",
        "When the newest run holding the instance or volume was stored, per repository "
        '(repository="hook": a hook-mode run not yet found in a repository).',
        [*ITEM_LABELS, "repository"],
        registry=registry,
    )
    window = Gauge(
        PREFIX + "quiesce_window_seconds",
        "How long the newest run holding it kept it quiesced (frozen, stopped, snapshotted).",
        ITEM_LABELS,
        registry=registry,
    )
    pairs = coverage.history(index, _all_repositories(index))
    for item in items:
        newest: dict[str, float] = {}
        for run, entry in pairs.get((item.kind, item.ref), []):
            if entry.failed is not None:
                continue
            for repo in run.repositories if run.attributed else ["hook"]:
                newest[repo] = max(newest.get(repo, 0.0), run.time)
            if entry.window is not None:
                window.labels(*_labels(item)).set(entry.window)
        for repo, when in newest.items():
            success.labels(*_labels(item), repo).set(when)


def _all_repositories(index: Index) -> set[str]:
    names = {"hook"}
    for run in index.runs.values():
        names |= set(run.repositories)
    return names


def _per_repository(registry: CollectorRegistry, runs: list[Run]) -> None:
    """What the newest run with figures read and added in each repository, the repository's
    size then, and the newest daemon downtime."""
    gauges = {
        "bytes_read": Gauge(
            PREFIX + "run_bytes_read",
            "Bytes the newest run read (original size).",
            ["repository", "member"],
            registry=registry,
        ),
        "added": Gauge(
            PREFIX + "run_bytes_added",
            "Deduplicated bytes the newest run added to the repository.",
            ["repository", "member"],
            registry=registry,
        ),
        "size": Gauge(
            PREFIX + "repository_size_bytes",
            "The repository's deduplicated size after the newest run.",
            ["repository", "member"],
            registry=registry,
        ),
    }
    downtime = Gauge(
        PREFIX + "daemon_downtime_seconds",
        "How long the newest run stopped the Incus daemon to copy its database.",
        ["member"],
        registry=registry,
    )
    for run in runs:  # oldest first: the newest value is set last
        for repo, stored in run.repositories.items():
            for attribute, gauge in gauges.items():
                value = getattr(stored, attribute)
                if value is not None:
                    gauge.labels(repo, run.member).set(value)
        if run.daemon_downtime is not None:
            downtime.labels(run.member).set(run.daemon_downtime)


def _per_command(registry: CollectorRegistry, index: Index, member: str) -> None:
    labels = ["command", "member"]
    code = Gauge(
        PREFIX + "last_exit_code",
        "Exit code of the command's last run (0 ok, 1 warnings, 2 error).",
        labels,
        registry=registry,
    )
    duration = Gauge(
        PREFIX + "last_run_duration_seconds",
        "How long the command's last run took.",
        labels,
        registry=registry,
    )
    ended = Gauge(
        PREFIX + "last_run_timestamp_seconds",
        "When the command's last run ended.",
        labels,
        registry=registry,
    )
    for command, outcome in sorted(index.commands.items()):
        code.labels(command, member).set(outcome.exit_code)
        duration.labels(command, member).set(outcome.duration)
        ended.labels(command, member).set(outcome.finished)
