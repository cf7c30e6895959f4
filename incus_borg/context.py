"""What every command runs with: the configuration, and how to reach borg and Incus."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .borg import Borg, Secrets
from .config import Config
from .incus import Incus


@dataclass(frozen=True)
class Context:
    """What every command runs with: the validated configuration, the file it came from
    (None for the built-in defaults), and whether to show details."""

    config: Config
    path: Path | None = None
    debug: bool = False

    def borg(self) -> Borg:
        """A borg runner holding the configuration's secrets."""
        return Borg(Secrets.from_config(self.config), debug=self.debug)

    def incus(self) -> Incus:
        """The configured Incus server."""
        return Incus(self.config.incus.dir)
