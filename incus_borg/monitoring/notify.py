"""Notifications of how a run went: healthchecks-style URLs (POST with urllib) and Apprise
URLs (the optional `apprise` library: mail, ntfy, Matrix, Slack and the rest).

Each notification is sent from a thread of its own, and a command waits for all of them at
most `notify.timeout` seconds in all: one that is refused, fails or is still under way then
is a warning, and the command goes on. Bodies are the log's last lines with every configured
passphrase taken out; warnings name a URL by its host only (a ping URL is a credential).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlsplit

from ..config import Notify

TAIL_LINES = 60  # lines of the log a body holds
TAIL_CHARS = 10_000  # and at most this many characters (healthchecks keeps 100 kB)
HIDDEN = "[secret]"
INSTALL_HINT = "pip install 'incus-borg[notify]'"


@dataclass(frozen=True)
class Message:
    """One notification: what ended (or began), how, and the log's tail."""

    title: str
    body: str
    outcome: str  # "start", "success", "warning" or "failure"


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """`text` without any of the secrets in it."""
    found = sorted({s for s in secrets if s}, key=len, reverse=True)
    return re.sub("|".join(map(re.escape, found)), HIDDEN, text) if found else text


def tail(lines: list[str], secrets: Iterable[str | None]) -> str:
    """The last lines of a log, within the size a body may have, secrets taken out."""
    text = redact("\n".join(lines[-TAIL_LINES:]), secrets)
    return text[-TAIL_CHARS:]


def where(url: str) -> str:
    """A URL named without its path, query or credentials."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def post(url: str, body: str, timeout: float) -> str | None:
    """POST `body` to a healthchecks-style URL; raises OSError when it is not delivered."""
    request = urllib.request.Request(
        url,
        data=body.encode("utf-8", "replace"),
        headers={"Content-Type": "text/plain; charset=utf-8", "User-Agent": "incus-borg"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        answer.read(1024)
    return None


def send_apprise(url: str, message: Message) -> str | None:
    """Tell one Apprise URL; why it was not delivered, or None."""
    try:
        import apprise
    except ImportError:
        return f"the apprise library is not installed: {INSTALL_HINT}"
    logging.getLogger("apprise").addHandler(logging.NullHandler())
    logging.getLogger("apprise").propagate = False
    target = apprise.Apprise()
    if not target.add(url):
        return "it is not a URL Apprise knows"
    kind = {
        "success": apprise.NotifyType.SUCCESS,
        "warning": apprise.NotifyType.WARNING,
        "failure": apprise.NotifyType.FAILURE,
    }.get(message.outcome, apprise.NotifyType.INFO)
    if not target.notify(body=message.body, title=message.title, notify_type=kind):
        return "Apprise reported a failure"
    return None


@dataclass
class Sender:
    """Notifications under way, each in its own thread."""

    settings: Notify
    jobs: list[tuple[str, threading.Thread, list[str]]] = field(default_factory=list)

    def _spawn(self, what: str, work: Callable[[], str | None]) -> None:
        problems: list[str] = []

        def run() -> None:
            try:
                reason = work()
            except Exception as exc:  # any failure to deliver is a warning, never an error
                reason = self._reason(exc)
            if reason:
                problems.append(f"{what} could not be delivered: {reason}")

        thread = threading.Thread(target=run, name=f"notify {what}", daemon=True)
        thread.start()
        self.jobs.append((what, thread, problems))

    def ping(self, key: str, url: str | None, body: str) -> None:
        """POST to one of the healthchecks-style URLs (`key` names it), when it is set."""
        if url:
            timeout = float(self.settings.timeout)
            self._spawn(f"notify.{key} ({where(url)})", partial(post, url, body, timeout))

    def tell(self, message: Message) -> None:
        """Tell every Apprise URL."""
        for url in self.settings.apprise:
            self._spawn(f"notify.apprise ({where(url)})", partial(send_apprise, url, message))

    @property
    def _late(self) -> str:
        return f"no answer within notify.timeout ({self.settings.timeout} s)"

    def _reason(self, exc: Exception) -> str:
        """Why a URL was not delivered, in a few words."""
        if isinstance(exc, urllib.error.HTTPError):
            return f"the server answered {exc.code} {exc.reason}"
        if isinstance(exc, urllib.error.URLError):
            exc = exc.reason if isinstance(exc.reason, Exception) else exc
        if isinstance(exc, TimeoutError):
            return self._late
        return str(getattr(exc, "reason", None) or exc) or type(exc).__name__

    def wait(self, started: float) -> list[str]:
        """Wait for every notification until `timeout` seconds after `started` (monotonic);
        returns what was not delivered."""
        deadline = started + self.settings.timeout
        problems = []
        for what, thread, found in self.jobs:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                problems.append(f"{what} could not be delivered: {self._late}")
            problems += found
        self.jobs.clear()
        return problems
