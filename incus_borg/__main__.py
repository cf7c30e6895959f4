"""Run as `python -m incus_borg`."""

from .cli import main

main()
