"""incus-borg: consistent, deduplicated Borg backups of a whole Incus server."""

from importlib.metadata import PackageNotFoundError, version

try:
    # Single-sourced from pyproject.toml, through the installed distribution's metadata.
    __version__ = version("incus-borg")
except PackageNotFoundError:  # a source tree on PYTHONPATH that was never installed
    __version__ = "unknown"
