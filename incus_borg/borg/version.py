"""Which borg runs, and whether it is one incus-borg can use (checked once per installed
binary, the answer remembered in the user's cache directory)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from ..errors import UserError

MIN_VERSION = (1, 4)


def find_borg() -> str:
    """The borg next to the running interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "borg"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("borg")
    if found is None:
        raise UserError("borg is not installed: pip install 'borgbackup>=1.4,<2'")
    return found


def checked_version(binary: str) -> str:
    """The version of `binary`, refusing anything older than borg 1.4."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(f"cannot run {binary} --version: {exc}") from None
    match = re.search(r"(\d+)\.(\d+)\.\S+", out)
    if match is None:
        raise UserError(f"cannot tell the version of {binary} from {out.strip()!r}")
    if (int(match.group(1)), int(match.group(2))) < MIN_VERSION or match.group(1) != "1":
        raise UserError(
            f"{binary} is borg {match.group(0)}; incus-borg needs borg 1.4 or newer 1.x: "
            "pip install 'borgbackup>=1.4,<2'"
        )
    return match.group(0)


class VersionCheck:
    """`checked_version`, remembered per borg binary in the user's cache directory, else run
    in a background thread, so that no borg command waits for it."""

    def __init__(self, binary: str) -> None:
        self._outcome: list[str | UserError] = []
        self._key = _binary_key(binary)
        known = _version_cache().get(self._key) if self._key else None
        if isinstance(known, str):
            self._outcome.append(known)
        self._thread = threading.Thread(target=self._check, args=(binary,), daemon=True)
        if not self._outcome:
            self._thread.start()

    def _check(self, binary: str) -> None:
        try:
            version = checked_version(binary)
        except UserError as exc:
            self._outcome.append(exc)
            return
        self._outcome.append(version)
        if self._key:
            _remember_version(self._key, version)

    def result(self) -> str:
        """The version, once known; raises the check's UserError."""
        if self._thread.ident is not None:
            self._thread.join()
        outcome = self._outcome[0]
        if isinstance(outcome, UserError):
            raise outcome
        return outcome


def _binary_key(binary: str) -> str | None:
    """What identifies one installed borg: its real path, size and mtime."""
    try:
        real = os.path.realpath(binary)
        st = os.stat(real)
    except OSError:
        return None
    return f"{real}:{st.st_size}:{st.st_mtime_ns}"


def _version_cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "incus-borg" / "borg-versions.json"


def _version_cache() -> dict[str, Any]:
    try:
        data = json.loads(_version_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember_version(key: str, version: str) -> None:
    """Store a checked version (best effort: a cache that cannot be written is skipped)."""
    path = _version_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps({**_version_cache(), key: version}))
        os.replace(tmp, path)
    except OSError:
        pass
