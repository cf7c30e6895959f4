"""What every command runs with: the configuration, and how to reach borg and Incus."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .borg import Borg, Secrets
from .config import Config
from .errors import UserError
from .incus import Incus
from .runs import EVERY, Scope


@dataclass(frozen=True)
class Context:
    """What every command runs with: the validated configuration, the file it came from
    (None for the built-in defaults), whether to show details, and the cluster member whose
    runs `latest` and `prune` mean (`--member`; None: this server's own)."""

    config: Config
    path: Path | None = None
    debug: bool = False
    member: str | None = None

    def borg(self) -> Borg:
        """A borg runner holding the configuration's secrets."""
        return Borg(Secrets.from_config(self.config), debug=self.debug)

    def incus(self) -> Incus:
        """The configured Incus server."""
        return Incus(self.config.incus.dir)

    def scope(self, every: bool = False) -> Scope:
        """Whose runs `latest` and `prune` mean: every member's (`every`), the one --member
        names, else this cluster member's (runs of servers not clustered when this one is
        not, or when its daemon does not answer)."""
        if every:
            return EVERY
        if self.member:
            return Scope(self.member)
        try:
            return Scope(self.incus().member())
        except UserError:
            return Scope(None)
