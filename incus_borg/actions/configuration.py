"""`incus-borg config generate|validate`: a sample configuration, a check of one, and a
borgmatic fragment that runs incus-borg's hooks around `borgmatic create`."""

from __future__ import annotations

import shlex
import shutil
import sys
from pathlib import Path

import yaml

from .. import config, layout, preflight
from ..context import Context

STDIN = "-"  # `config validate -` reads the configuration from standard input
STDIN_NAME = "standard input"


def command_prefix(ctx: Context) -> str:
    """How borgmatic's shell should call this incus-borg, with this configuration."""
    found = shutil.which("incus-borg")
    program = shlex.quote(found) if found else f"{shlex.quote(sys.executable)} -m incus_borg"
    if ctx.path is None:
        return program
    return f"{program} -c {shlex.quote(str(ctx.path.resolve()))}"


def fragment(ctx: Context) -> str:
    """The fragment to merge into a borgmatic configuration file (YAML with a header)."""
    prefix = command_prefix(ctx)
    # A warning (exit 1) leaves a complete staging tree: do not fail borgmatic's run for it.
    tolerate = " || test $? -eq 1"
    staging = Path(ctx.config.staging_dir)
    data = {
        "source_directories": [f"{staging}/./"],
        # The instances' `user.incus-borg.exclude` patterns, written by `hook pre`.
        "exclude_from": [str(layout.excludes_file(staging))],
        "files_cache": "mtime,size",
        "numeric_ids": True,
        "commands": [
            {"before": "action", "when": ["create"], "run": [f"{prefix} hook pre{tolerate}"]},
            # After a create that worked only: `hook post` records the run as a backup.
            {
                "after": "action",
                "when": ["create"],
                "states": ["finish"],
                "run": [f"{prefix} hook post{tolerate}"],
            },
            {"after": "error", "run": [f"{prefix} hook post --failed{tolerate}"]},
        ],
    }
    header = (
        "# borgmatic 2.x fragment for this host (incus-borg config generate --borgmatic).\n"
        "# Merge it into a borgmatic configuration that names your repositories.\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, width=1000)


def generate(ctx: Context, for_borgmatic: bool) -> str:
    """A commented sample configuration, or a borgmatic fragment for this host."""
    return fragment(ctx) if for_borgmatic else config.sample()


def validate(file: str | None) -> str:
    """Check a configuration file (`-`: standard input), and what a run would trip over;
    says which one was valid."""
    if file == STDIN:
        loaded, source = config.parse(sys.stdin.read(), STDIN_NAME), STDIN_NAME
    else:
        loaded, path = config.load(file)
        source = str(path or "built-in defaults")
    preflight.check(loaded, source)
    return f"{source}: valid"
