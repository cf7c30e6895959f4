"""How a command tells the world how it went, as it ends: the run it made goes into the local
index, the command's exit code and duration too, the Prometheus metrics file is rewritten
(when `metrics_file` is set), and notifications are sent (see notify.py).

`backup` and `hook pre` ping `notify.start_url` as they begin; `backup` and `hook post` ping
`success_url` or `failure_url` as they end (a prune or a check never stands in for a backup
there); `backup`, `hook post`, `prune` and `check` tell the Apprise URLs when they end as
`notify.when` lists. `hook post --failed` ends a failed hook-mode run: it notifies a failure.
A notification, the index or the metrics file that cannot be written is a warning (exit 1).
"""

from __future__ import annotations

import io
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TextIO

from .. import layout, profile
from ..backup.capture import Capture
from ..backup.plan import Plan
from ..backup.session import Session
from ..context import Context
from ..errors import EXIT_ERROR, EXIT_OK, EXIT_WARNING, UserError, Warnings
from ..manifest import Manifest
from . import coverage, metrics
from .coverage import Standing
from .index import Ending, Entry, IndexFile, Run, Stored
from .notify import Message, Sender, tail

LOG_LINES = 200  # lines of output kept for a notification's body
PARTIAL_CHARS = 1000  # of a line still being written
PASSPHRASE_ENV = "BORG_PASSPHRASE"


@dataclass(frozen=True)
class Notices:
    """What a command sends: the start ping, the success or failure ping, Apprise."""

    start: bool = False
    end: bool = False
    tell: bool = True


COMMANDS = {
    "backup": Notices(start=True, end=True),
    "hook pre": Notices(start=True, tell=False),  # its failure is told by `hook post --failed`
    "hook post": Notices(end=True),
    "prune": Notices(),
    "check": Notices(),
}


class Figures(Protocol):
    """What a backup reports per repository (actions/backup.py's Outcome)."""

    archives: dict[str, list[str]]
    read: dict[str, int]
    added: dict[str, int]
    files: dict[str, int]
    size: dict[str, int | None]


class _Tee(io.TextIOBase):
    """A text stream that writes through to another and keeps the lines it saw."""

    def __init__(self, stream: TextIO, lines: deque[str]) -> None:
        self._stream = stream
        self._lines = lines
        self._partial = ""

    def write(self, text: str) -> int:
        self._stream.write(text)
        *done, partial = (self._partial + text).split("\n")
        self._lines.extend(done)
        self._partial = partial[-PARTIAL_CHARS:]  # progress lines end in \r, not \n
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._stream.errors


@dataclass
class Watch:
    """One command, watched from its start to its end."""

    ctx: Context
    command: str
    failed: bool = False  # `hook post --failed`: the hook-mode run failed
    started: float = field(default_factory=time.monotonic)
    log: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    warnings: Warnings = field(default_factory=Warnings)

    def __post_init__(self) -> None:
        self.notices = COMMANDS[self.command]
        self.sender = Sender(self.ctx.config.notify)
        self._streams = (sys.stdout, sys.stderr)

    def begin(self) -> None:
        """Keep the command's output for the notification, and ping `start_url`."""
        sys.stdout = _Tee(sys.stdout, self.log)
        sys.stderr = _Tee(sys.stderr, self.log)
        if self.notices.start:
            host = socket.gethostname()
            self.sender.ping(
                "start_url",
                self.ctx.config.notify.start_url,
                f"incus-borg {self.command} started on {host}",
            )

    def end(self, code: int, error: BaseException | None = None) -> int:
        """Notify, then record how the command ended and rewrite the metrics; returns the
        exit code (1 when something of that could not be done)."""
        sys.stdout, sys.stderr = self._streams
        if error is not None:
            self.log.append(f"incus-borg: error: {describe(error)}")
            code = EXIT_ERROR
        outcome = EXIT_ERROR if self.failed else code
        self._notify(outcome)
        code = max(code, self.warnings.exit_code)
        ended = Ending(max(code, outcome), time.time(), time.monotonic() - self.started)
        for problem in record(self.ctx, self.command, ended):
            self.warnings.add(problem)
        return max(code, self.warnings.exit_code)

    def _notify(self, code: int) -> None:
        settings = self.ctx.config.notify
        outcome = {EXIT_OK: "success", EXIT_WARNING: "warning"}.get(code, "failure")
        host = socket.gethostname()
        title = f"incus-borg {self.command} on {host}: {outcome} (exit {code})"
        message = Message(title, tail(list(self.log), secrets(self.ctx)), outcome)
        if self.notices.end:
            failing = outcome == "failure" or (outcome in settings.when and outcome == "warning")
            key = "failure_url" if failing else "success_url"
            self.sender.ping(key, getattr(settings, key), f"{title}\n\n{message.body}")
        if self.notices.tell and outcome in settings.when:
            self.sender.tell(message)
        for problem in self.sender.wait(time.monotonic()):
            self.warnings.add(problem)


def watched(
    ctx: Context,
    command: str,
    action: Callable[[], int],
    *,
    enabled: bool = True,
    failed: bool = False,
) -> int:
    """Run a command's action, then record and notify how it ended (not when `enabled` is
    false: a dry run); returns its exit code."""
    if not enabled:
        return action()
    watch = Watch(ctx, command, failed)
    with profile.phase("monitoring: begin"):
        watch.begin()
    try:
        code = action()
    except BaseException as exc:
        with profile.phase("monitoring: end"):
            watch.end(EXIT_ERROR, exc)
        raise
    with profile.phase("monitoring: end"):
        return watch.end(code)


def describe(error: BaseException) -> str:
    """An error as the command line reports it."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted; every quiesce was undone"
    if isinstance(error, UserError):
        return str(error)
    return f"unexpected {type(error).__name__}: {error}"


def secrets(ctx: Context) -> list[str | None]:
    """Every passphrase the configuration or the environment holds."""
    config = ctx.config
    found = [config.encryption_passphrase, os.environ.get(PASSPHRASE_ENV)]
    return found + [repo.encryption_passphrase for repo in config.repositories]


# --- the index and the metrics ---------------------------------------------------------------


def index_file(ctx: Context) -> IndexFile:
    """The local index of this configuration."""
    return IndexFile(ctx.config.staging_dir)


def record(ctx: Context, command: str, ended: Ending) -> list[str]:
    """Remember how `command` ended and rewrite the metrics file; returns what failed."""
    problems = []
    if not os.path.isabs(ctx.config.staging_dir):
        return []  # a configuration refused before anything ran: no place to keep an index
    try:
        with index_file(ctx).update() as index:
            index.commands[command] = ended
    except UserError as exc:
        return [str(exc)]
    path = ctx.config.metrics_file
    if path:
        try:
            metrics.write(path, index, standings(ctx), this_member())
        except UserError as exc:
            problems.append(str(exc))
    return problems


def standings(ctx: Context, label: str | None = None) -> list[Standing] | None:
    """The state of every instance and volume on the server now (None when the server does
    not answer)."""
    config = ctx.config
    try:
        live = coverage.live_items(ctx.incus(), config.instances)
    except UserError:
        return None
    index = index_file(ctx).load()
    return coverage.assess(live, index, coverage.limits(config, label), time.time())


def this_member() -> str:
    """The member name of this host's runs: its hostname until runs are named per member."""
    return socket.gethostname()


def record_backup(ctx: Context, capture: Capture, plan: Plan, figures: Figures) -> None:
    """Put a backup's run into the index, with what each repository holding it reported."""
    if not figures.archives:
        return
    session = capture.session
    run = Run(
        run=session.run,
        member=getattr(session, "member", None) or this_member(),
        hostname=socket.gethostname(),
        created=session.created,
        mode=session.mode,
        hook_mode=False,
        partial=plan.partial,
        daemon_downtime=capture.daemon_downtime,
        items=[Entry.of(item) for item in plan.instances + plan.volumes],  # left out ones too
        repositories={
            name: Stored(
                archives[0],
                figures.read.get(name),
                figures.added.get(name),
                figures.files.get(name),
                figures.size.get(name),
            )
            for name, archives in figures.archives.items()
        },
        finished=time.time(),
        groups=list(plan.groups),
    )
    with index_file(ctx).update() as index:
        index.add(run)


def hook_run(session: Session) -> Manifest | None:
    """The manifest of the hook-mode run `hook pre` made ready, read before `hook post`
    empties staging; None when no run is ready."""
    journal = session.journal.read() or {}
    if journal.get("kind") != "hook" or journal.get("phase") != "ready":
        return None
    try:
        manifest = Manifest.from_json(session.stage.path(layout.MANIFEST).read_text())
    except (OSError, UserError):
        return None
    return manifest if manifest.run == journal.get("run") else None


def record_hook_run(ctx: Context, manifest: Manifest | None) -> None:
    """Put a hook-mode run into the index; the repositories holding it are not known until
    `status --refresh` finds it."""
    if manifest is not None:
        with index_file(ctx).update() as index:
            index.add(Run.of(manifest, time.time(), attributed=False))


def forget(ctx: Context, repository: str, archives: list[str]) -> None:
    """`prune` deleted these archives of `repository`."""
    with index_file(ctx).update() as index:
        index.forget(repository, set(archives))
