"""Running the real `incus-borg` command line in tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

PASSPHRASE = "correct horse battery staple"
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
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


def incus_config(server: object, root: Path, **extra: object) -> Path:
    """A configuration for a private Incus server (`harness.server.IncusServer`), with its
    own repository, staging directory and copies of subuid/subgid under `root`."""
    daemon = server.daemon  # type: ignore[attr-defined]
    root.mkdir(parents=True, exist_ok=True)
    for name in ("subuid", "subgid"):
        (root / name).write_text("root:1000000:1000000000\n")
    data: dict[str, object] = {
        "repositories": [{"path": str(root / "repo"), "label": "local"}],
        "encryption_passphrase": PASSPHRASE,
        "incus": {
            "dir": str(daemon.incus_dir),
            "stop_command": daemon.stop_command(),
            "start_command": daemon.start_command(),
            "subuid": str(root / "subuid"),
            "subgid": str(root / "subgid"),
        },
        "staging_dir": str(root / "staging"),
    }
    data.update(extra)
    return write_config(root / "config.yaml", data)


def borg_env() -> dict[str, str]:
    """Environment for running borg directly on a test repository."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BORG_")}
    return {**clean, "BORG_PASSPHRASE": PASSPHRASE, "BORG_EXIT_CODES": "modern"}


def borg(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the venv's borg with the test passphrase; fails the test on an error exit."""
    binary = str(Path(sys.executable).parent / "borg")
    done = subprocess.run(
        [binary, *args], capture_output=True, text=True, env=borg_env(), cwd=cwd, check=False
    )
    assert done.returncode in (0, 1), done.stderr
    return done


def tool_env(config: Path) -> dict[str, str]:
    """What borgmatic, restic and the hooks need: the venv first on PATH, the config."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("BORG_", "INCUS_BORG"))}
    return clean | {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "INCUS_BORG": str(BIN / "incus-borg"),
        "INCUS_BORG_CONFIG": str(config),
    }


def borgmatic_config(example: Path, root: Path, repo: Path, config: Path) -> dict[str, Any]:
    """An example borgmatic config with this test's paths, and no monitoring over the network."""
    data: dict[str, Any] = yaml.safe_load(example.read_text())
    data["source_directories"] = [f"{root / 'staging'}/./"]
    data["repositories"] = [{"path": str(repo), "label": "local"}]
    data["encryption_passphrase"] = PASSPHRASE
    data.pop("healthchecks", None)
    for hook in data.get("commands", []):
        hook["run"] = [_local_hook(line, config) for line in hook["run"]]
    for key in ("before_backup", "after_backup", "on_error"):
        if key in data:
            data[key] = [_local_hook(line, config) for line in data[key]]
    return data


def _local_hook(line: str, config: Path) -> str:
    return line.replace("/opt/incus-borg", str(ROOT)).replace(
        "/etc/incus-borg/config.yaml", str(config)
    )
