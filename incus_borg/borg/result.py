"""What a finished borg call returned: its exit code, output and --log-json messages."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError


@dataclass
class BorgResult:
    """What a finished borg call returned (`stalled_after`: the watchdog stopped it after that
    many seconds without a sign of progress)."""

    returncode: int
    stdout: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    stalled_after: float | None = None

    @property
    def problems(self) -> list[str]:
        """Borg's WARNING and ERROR log lines."""
        return [
            str(m.get("message", "")).strip()
            for m in self.messages
            if m.get("levelname") in ("WARNING", "ERROR", "CRITICAL")
        ]

    @property
    def warnings(self) -> list[str]:
        """What to report as warnings: borg's problems, when it exited with a warning code.

        (A successful run also logs harmless warnings, such as a new files cache.)
        """
        return self.problems if is_warning(self.returncode) else []

    def json(self) -> Any:
        """stdout decoded as JSON."""
        return json.loads(self.stdout)

    @property
    def changed_files(self) -> int:
        """Files a `create --list` logged as added, modified or unreadable (not unchanged)."""
        return len(file_statuses(self.messages, "AME"))


def file_statuses(messages: list[dict[str, Any]], statuses: str) -> list[str]:
    """The paths that `create --list` logged with one of `statuses` (such as "x":
    excluded)."""
    return [
        str(m.get("path", ""))
        for m in messages
        if m.get("type") == "file_status" and str(m.get("status")) in statuses
    ]


class Stalled(UserError):
    """Borg showed no sign of progress for the caller's `stall_timeout` and was stopped."""


def is_warning(code: int) -> bool:
    return code == 1 or 100 <= code <= 127


def progress_line(message: Mapping[str, Any]) -> str:
    """One progress message of borg's, as a short line."""
    if message.get("type") == "archive_progress":
        size = int(message.get("original_size") or 0) / 1e6
        return f"{message.get('nfiles', 0)} files, {size:.1f} MB read  {message.get('path', '')}"[
            :100
        ]
    return str(message.get("message", ""))[:100]


def parse_log_json(stderr: str) -> list[dict[str, Any]]:
    """Borg's --log-json lines as dicts; lines that are not JSON become plain messages."""
    messages: list[dict[str, Any]] = []
    for line in stderr.splitlines():
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            item = {"type": "log_message", "levelname": "ERROR", "message": line}
        if isinstance(item, dict):
            messages.append(item)
    return messages
