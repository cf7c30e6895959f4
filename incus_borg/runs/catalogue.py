"""The run catalogue: the small files of each run `backup` made on this host (its manifest, its
definitions, its instances' import files), kept beside the staging directory so that `list`
and `restore` need not read them back out of the repository. Reading any file of an archive
means a `borg extract` that walks the metadata of every file the archive holds: for one run
of 40 containers that is a borg start and about 0.3 s, growing with the server.

One file per archive and repository, below `<staging_dir>.runs/` (0700; its files 0600),
named after the repository's location and the archive. Each entry names the archive's id: a
lookup that knows the id (from the repository's listing) ignores an entry of another id,
and one that does not know it (an archive named on the command line) is checked by the
caller against the archive's own listing. A missing, unreadable or foreign entry is a miss:
the run is read from the repository, as on a host that never made it. `prune` removes the
entries of the archives it deletes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

FORMAT = 1


@dataclass(frozen=True)
class Catalogue:
    """The run catalogue of one staging directory."""

    root: Path

    @classmethod
    def beside(cls, staging_dir: str | Path) -> Catalogue:
        """The catalogue of the configuration whose staging directory this is."""
        return cls(Path(str(staging_dir).rstrip("/") + ".runs"))

    def entry(self, repository: str, archive: str) -> Path:
        """Where the entry of `archive` in the repository at `repository` lies."""
        where = hashlib.sha256(repository.encode()).hexdigest()[:16]
        return self.root / where / (quote(archive, safe="") + ".json")

    def store(
        self, repository: str, archive: str, archive_id: str, files: dict[str, bytes]
    ) -> None:
        """Record an archive's small files (path in the archive -> content); a failure to
        write leaves no entry (the catalogue is an accelerator, never the record)."""
        path = self.entry(repository, archive)
        data = {
            "format": FORMAT,
            "archive": archive,
            "id": archive_id,
            "files": {name: base64.b64encode(content).decode() for name, content in files.items()},
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.root, 0o700)
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            tmp.replace(path)
        except OSError:
            return

    def load(self, repository: str, archive: str, archive_id: str | None) -> dict[str, bytes]:
        """The files recorded for an archive (empty: none, or an entry of another id)."""
        try:
            data = json.loads(self.entry(repository, archive).read_text())
            if data.get("format") != FORMAT or data.get("archive") != archive:
                return {}
            if archive_id is not None and data.get("id") != archive_id:
                return {}
            return {name: base64.b64decode(text) for name, text in data["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def forget(self, repository: str, archives: list[str]) -> None:
        """Remove the entries of archives deleted from the repository."""
        for archive in archives:
            try:
                self.entry(repository, archive).unlink(missing_ok=True)
            except OSError:
                continue  # a leftover entry is checked against the repository before any use
