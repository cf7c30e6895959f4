"""Errors the admin can act on, and the warnings a run collects."""

from __future__ import annotations

import sys

EXIT_OK = 0
EXIT_WARNING = 1
EXIT_ERROR = 2


class UserError(Exception):
    """A problem the admin can fix: reported as one line on stderr with exit code 2."""


class Warnings:
    """Warnings collected during a command; any warning makes the exit code 1."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        """Record a warning and print it at once."""
        self.messages.append(message)
        print(f"incus-borg: warning: {message}", file=sys.stderr)

    @property
    def exit_code(self) -> int:
        """1 when anything was warned about, else 0."""
        return EXIT_WARNING if self.messages else EXIT_OK
