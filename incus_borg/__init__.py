"""incus-borg: consistent, deduplicated Borg backups of a whole Incus server."""

__version__ = "0.1.0"
