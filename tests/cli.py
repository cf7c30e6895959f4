"""Running the real `incus-borg` command line in tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

PASSPHRASE = "correct horse battery staple"


def run_cli(
    *args: str,
    config: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run `incus-borg [-c CONFIG] ARGS...` as a subprocess and capture its output."""
    argv = [sys.executable, "-m", "incus_borg"]
    if config is not None:
        argv += ["-c", str(config)]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("BORG_", "INCUS_BORG"))}
    return subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        env={**full_env, **(env or {})},
        timeout=timeout,
        check=False,
    )


def write_config(path: Path, data: dict[str, object]) -> Path:
    """Write a configuration file and return its path."""
    path.write_text(yaml.safe_dump(data))
    return path


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """The single error line of a failed run (asserting exit 2 and no traceback)."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return errors[0]
