"""`incus-borg --version` (incus-borg, borg, Incus: each said even when missing or down) and
`config validate -`, through the real command line."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from cli import incus_config, one_line_error, run_cli, write_config
from harness.server import IncusServer

ROOT = Path(__file__).resolve().parents[1]
VENV_BORG = Path(sys.executable).parent / "borg"


def versions(*args: str, config: Path | None = None) -> list[str]:
    """The lines of `incus-borg [-c CONFIG] ARGS... --version`, asserting exit 0."""
    done = run_cli(*args, "--version", config=config)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout
    return lines


def test_version_names_incus_borg_borg_and_incus(incus_server: IncusServer, tmp_path: Path) -> None:
    config = incus_config(incus_server, tmp_path)
    server = incus_server.daemon.query("/1.0")["environment"]["server_version"]
    lines = versions(config=config)
    assert lines == [
        f"incus-borg {version('incus-borg')}",
        f"borg {version('borgbackup')} ({VENV_BORG})",
        f"incus {server} ({incus_server.daemon.incus_dir})",
    ]


def test_version_says_incus_is_unreachable(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", {"incus": {"dir": str(tmp_path)}})
    lines = versions(config=config)
    assert lines[1].startswith(f"borg {version('borgbackup')} ")
    assert lines[2] == (
        f"incus unreachable: Incus is not reachable at {tmp_path}/unix.socket: is incusd running?"
    )


def test_version_says_a_bad_config_instead_of_incus(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", {"mode": "sideways"})
    assert versions(config=config)[2].startswith(f"incus unknown: config {config}: 'mode'")


@pytest.fixture
def bare_python(tmp_path: Path) -> Path:
    """A venv with no borg beside its interpreter; incus-borg and click come from PYTHONPATH."""
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv / "bin" / "python"


def run_bare(python: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`incus-borg --version` under `python`, with nothing on PATH (so no borg either)."""
    site = next(p for p in sys.path if p.endswith("site-packages"))
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    config = write_config(tmp_path / "c.yaml", {"incus": {"dir": str(tmp_path)}})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BORG_", "INCUS_BORG"))}
    env |= {"PATH": str(empty), "PYTHONPATH": f"{ROOT}:{site}"}
    argv = [str(python), "-m", "incus_borg", "-c", str(config), "--version"]
    return subprocess.run(argv, capture_output=True, text=True, env=env, check=False)


def test_version_says_borg_is_missing(bare_python: Path, tmp_path: Path) -> None:
    done = run_bare(bare_python, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"incus-borg {version('incus-borg')}"
    assert lines[1] == "borg missing: borg is not installed: pip install 'borgbackup>=1.4,<2'"
    assert lines[2].startswith("incus unreachable: ")


def test_version_says_borg_is_too_old(bare_python: Path, tmp_path: Path) -> None:
    old = bare_python.parent / "borg"
    old.write_text('#!/bin/sh\necho "borg 1.2.4"\n')
    old.chmod(0o755)
    done = run_bare(bare_python, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1] == (
        f"borg unusable: {old} is borg 1.2.4; incus-borg needs borg 1.4 or newer 1.x: "
        "pip install 'borgbackup>=1.4,<2'"
    )


def validate_stdin(text: str) -> subprocess.CompletedProcess[str]:
    """`incus-borg config validate -` with `text` on standard input."""
    argv = [sys.executable, "-m", "incus_borg", "config", "validate", "-"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BORG_", "INCUS_BORG"))}
    return subprocess.run(argv, input=text, capture_output=True, text=True, env=env, check=False)


def test_config_validate_reads_standard_input() -> None:
    sample = run_cli("config", "generate").stdout
    done = validate_stdin(sample)
    assert (done.returncode, done.stdout) == (0, "standard input: valid\n"), done.stderr
    error = one_line_error(validate_stdin(sample.replace("mode: auto", "mode: sideways")))
    assert "config standard input: 'mode' must be one of" in error
