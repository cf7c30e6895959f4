"""borgmatic and restic driving incus-borg's hooks, and restores from what they stored."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cli import BIN, PASSPHRASE, ROOT, borg, borgmatic_config, incus_config, run_cli, tool_env
from harness.server import IncusServer

from incus_borg.host import mounts

EXAMPLES = ROOT / "examples"
DOCUMENTED = "docs/integrations.md"  # the page holding copies of the example files
NAMES = ("ig-dir", "ig-fast")


@dataclass
class Env:
    """A server with two instances, an incus-borg config and a borgmatic config for it."""

    server: IncusServer
    root: Path
    config: Path
    borgmatic: Path

    def tool_env(self) -> dict[str, str]:
        """What borgmatic, restic and the hooks need: the venv first on PATH, our config."""
        return tool_env(self.config)

    def assert_released(self) -> None:
        """Nothing frozen, no temporary snapshot, nothing mounted, no journal."""
        for name in NAMES:
            assert self.server.state(name) == "Running"
            snaps = self.server.daemon.query(f"/1.0/instances/{name}/snapshots")
            assert not [s for s in snaps if "incus-borg-" in s]
        assert not mounts.mounts_below(self.root / "staging")
        assert not (self.root / "staging.journal").exists()


@pytest.fixture(scope="module")
def env(incus_server: IncusServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("integrations")
    incus_server.launch("ig-dir", files={"/root/d": (os.urandom(50_000), 0, 0, 0o600)})
    incus_server.launch("ig-fast", pool="fast", files={"/home/user/f": (b"f\n", 1000, 1000, 0o644)})
    config = incus_config(incus_server, root, instances=list(NAMES))
    data = borgmatic_config(EXAMPLES / "borgmatic/config.yaml", root, root / "repo", config)
    path = root / "borgmatic.yaml"
    path.write_text(yaml.safe_dump(data))
    yield Env(incus_server, root, config, path)
    for name in NAMES:
        incus_server.delete(name)


def borgmatic(env: Env, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "borgmatic"), "-c", str(config or env.borgmatic), *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env.tool_env(), check=False)


def test_borgmatic_create_then_restore(env: Env) -> None:
    created = borgmatic(env, "repo-create", "--encryption", "repokey-blake2")
    assert created.returncode == 0, created.stderr
    done = borgmatic(env, "create", "--verbosity", "1")
    assert done.returncode == 0, done.stderr
    assert "just in time while Borg reads it" in done.stderr, done.stderr
    assert "frozen 1 time(s) while Borg read it" in done.stderr, done.stderr
    assert "released every quiesce" in done.stderr
    env.assert_released()
    archives = json.loads(borg("list", "--json", str(env.root / "repo")).stdout)["archives"]
    assert len(archives) == 1
    before = env.server.checksums("ig-dir")
    env.server.delete("ig-dir")
    restored = run_cli(
        "restore", "instance", archives[0]["name"], "ig-dir", "--start", config=env.config
    )
    assert restored.returncode == 0, restored.stderr
    assert env.server.checksums("ig-dir") == before
    env.assert_released()


def test_borgmatic_failure_runs_the_error_hook(env: Env) -> None:
    data = yaml.safe_load(env.borgmatic.read_text())
    data["repositories"] = [{"path": str(env.root / "no-such-repo"), "label": "missing"}]
    broken = env.root / "broken.yaml"
    broken.write_text(yaml.safe_dump(data))
    done = borgmatic(env, "create", "--verbosity", "1", config=broken)
    assert done.returncode != 0
    assert "after a failed backup" in done.stderr, done.stderr
    env.assert_released()


def test_failing_pre_hook_fails_borgmatic_and_runs_post(env: Env, tmp_path: Path) -> None:
    data = yaml.safe_load(env.config.read_text())
    data["incus"]["dir"] = str(tmp_path / "no-incus-here")  # hook pre cannot reach Incus
    broken_config = tmp_path / "broken-incus.yaml"
    broken_config.write_text(yaml.safe_dump(data))
    borgmatic_data = borgmatic_config(
        EXAMPLES / "borgmatic/config.yaml", env.root, env.root / "repo", broken_config
    )
    path = tmp_path / "borgmatic.yaml"
    path.write_text(yaml.safe_dump(borgmatic_data))
    before = borg("list", "--short", str(env.root / "repo")).stdout
    done = borgmatic(env, "create", "--verbosity", "1", config=path)
    assert done.returncode != 0
    assert "Incus is not reachable" in done.stderr
    assert "after a failed backup" in done.stderr, done.stderr  # the error hook ran
    assert borg("list", "--short", str(env.root / "repo")).stdout == before  # no archive made
    env.assert_released()


@pytest.mark.parametrize("example", ["config.yaml", "config-1.x.yaml"])
def test_example_configs_validate(env: Env, example: str) -> None:
    path = EXAMPLES / "borgmatic" / example
    done = subprocess.run(
        [str(BIN / "borgmatic"), "config", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_generated_fragment_runs_under_borgmatic(env: Env) -> None:
    done = run_cli("config", "generate", "--borgmatic", config=env.config)
    assert done.returncode == 0, done.stderr
    data = yaml.safe_load(done.stdout)
    assert data["source_directories"] == [f"{env.root / 'staging'}/./"]
    data |= {
        "repositories": [{"path": str(env.root / "repo"), "label": "local"}],
        "encryption_passphrase": PASSPHRASE,
    }
    path = env.root / "fragment.yaml"
    path.write_text(yaml.safe_dump(data))
    assert borgmatic(env, "config", "validate", config=path).returncode == 0
    created = borgmatic(env, "create", config=path)
    assert created.returncode == 0, created.stderr
    env.assert_released()


def test_restic_wrapper_then_restore_from_directory(env: Env, tmp_path: Path) -> None:
    restic_env = env.tool_env() | {
        "RESTIC_REPOSITORY": str(tmp_path / "restic"),
        "RESTIC_PASSWORD": PASSPHRASE,
        "HOOKS": str(ROOT / "hooks"),
        "STAGING": str(env.root / "staging"),
    }
    assert subprocess.run(["restic", "init"], env=restic_env, capture_output=True).returncode == 0
    wrapper = EXAMPLES / "restic/incus-restic-backup"
    done = subprocess.run([str(wrapper)], env=restic_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "whole-run hold" in done.stderr, done.stderr
    env.assert_released()
    target = tmp_path / "restored"
    restore = ["restic", "restore", "latest", "--target", str(target)]
    assert subprocess.run(restore, env=restic_env, capture_output=True).returncode == 0
    tree = target / str(env.root / "staging").lstrip("/")
    back = run_cli(
        "restore", "instance", str(tree), "ig-fast", "--as", "ig-restic", config=env.config
    )
    assert back.returncode == 0, back.stderr
    try:
        env.server.start("ig-restic")
        assert env.server.checksums("ig-restic") == env.server.checksums("ig-fast")
        assert env.server.owner("ig-restic", "/home/user/f") == (1000, 1000)
    finally:
        env.server.delete("ig-restic")


def test_documented_snippets_equal_examples() -> None:
    page = (ROOT / DOCUMENTED).read_text()
    blocks = re.findall(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```", page, re.S)
    assert {name for name, _ in blocks} >= {
        "examples/borgmatic/config.yaml",
        "examples/borgmatic/config-1.x.yaml",
        "examples/restic/incus-restic-backup",
        "examples/systemd/incus-borg.service",
        "examples/systemd/incus-borg.timer",
        "examples/systemd/incus-borg-drill.service",
        "examples/systemd/incus-borg-drill.timer",
    }
    for name, text in blocks:
        assert (ROOT / name).read_text() == text, (
            f"{DOCUMENTED}'s copy of {name} differs from the file"
        )
