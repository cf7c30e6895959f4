"""`init` and `list` against real Borg repositories."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest
from cli import PASSPHRASE, one_line_error, run_cli, write_config

from incus_borg import borg
from incus_borg.errors import UserError
from incus_borg.host import signals


def repo_config(tmp_path: Path, **extra: object) -> Path:
    data: dict[str, object] = {
        "repositories": [{"path": str(tmp_path / "repo"), "label": "local"}],
        "encryption_passphrase": PASSPHRASE,
    }
    data.update(extra)
    return write_config(tmp_path / "config.yaml", data)


def test_init_then_list(tmp_path: Path) -> None:
    config = repo_config(tmp_path)
    done = run_cli("init", config=config)
    assert done.returncode == 0, done.stderr
    assert "repokey-blake2" in done.stdout
    key = tmp_path / "local.borg-key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert "BORG_KEY" in key.read_text()
    assert str(key) in done.stdout and "OFF THIS HOST" in done.stdout
    assert PASSPHRASE not in done.stdout + done.stderr

    again = run_cli("init", config=config)
    assert again.returncode == 0 and "already exists" in again.stdout

    listed = run_cli("list", "--json", config=config)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {"local": []}
    assert "0 run(s)" in run_cli("list", config=config).stdout


def test_init_refuses_without_passphrase_unless_encryption_none(tmp_path: Path) -> None:
    data = {"repositories": [{"path": str(tmp_path / "repo"), "label": "plain"}]}
    config = write_config(tmp_path / "c.yaml", data)
    error = one_line_error(run_cli("init", config=config))
    assert "no passphrase is configured" in error and "encryption: none" in error
    assert not (tmp_path / "repo").exists()

    data["repositories"][0]["encryption"] = "none"
    write_config(tmp_path / "c.yaml", data)
    done = run_cli("init", config=config)
    assert done.returncode == 0, done.stderr
    assert run_cli("list", config=config).returncode == 0


def test_wrong_passphrase_is_one_line(tmp_path: Path) -> None:
    config = repo_config(tmp_path)
    assert run_cli("init", config=config).returncode == 0
    repo_config(tmp_path, encryption_passphrase="wrong")
    error = one_line_error(run_cli("list", config=config))
    assert "wrong passphrase for repository local" in error


def test_passphrase_from_environment_and_passcommand(tmp_path: Path) -> None:
    config = repo_config(tmp_path)
    assert run_cli("init", config=config).returncode == 0
    data = {"repositories": [{"path": str(tmp_path / "repo"), "label": "local"}]}
    write_config(config, data)
    assert run_cli("list", config=config, env={"BORG_PASSPHRASE": PASSPHRASE}).returncode == 0
    secret = tmp_path / "pass"
    secret.write_text(PASSPHRASE)
    write_config(config, {**data, "encryption_passcommand": f"cat {secret}"})
    assert run_cli("list", config=config).returncode == 0


def test_passphrase_per_repository(tmp_path: Path) -> None:
    repos = [
        {"path": str(tmp_path / "a"), "label": "a", "encryption_passphrase": "first secret"},
        {"path": str(tmp_path / "b"), "label": "b", "encryption_passphrase": "second secret"},
    ]
    config = write_config(tmp_path / "c.yaml", {"repositories": repos})
    assert run_cli("init", config=config).returncode == 0
    assert run_cli("list", config=config).returncode == 0
    repos[1]["encryption_passphrase"] = "first secret"
    write_config(config, {"repositories": repos})
    error = one_line_error(run_cli("list", config=config))
    assert "wrong passphrase for repository b" in error


def test_missing_repository_suggests_init(tmp_path: Path) -> None:
    error = one_line_error(run_cli("list", config=repo_config(tmp_path)))
    assert "does not exist: run `incus-borg init`" in error


def test_unknown_repository_label(tmp_path: Path) -> None:
    error = one_line_error(run_cli("list", "--repository", "offsite", config=repo_config(tmp_path)))
    assert "no repository labelled 'offsite'" in error


def test_old_borg_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "borg"
    fake.write_text("#!/bin/sh\necho 'borg 1.2.8'\n")
    fake.chmod(0o755)
    with pytest.raises(UserError, match=r"borg 1\.2\.8; incus-borg needs borg 1\.4"):
        borg.checked_version(str(fake))


def test_borg_version_is_checked_once_per_installed_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fake = tmp_path / "borg"
    fake.write_text("#!/bin/sh\necho 'borg 1.4.5'\n")
    fake.chmod(0o755)
    assert borg.Borg(borg.Secrets(), binary=str(fake)).version == "1.4.5"
    assert (tmp_path / "cache" / "incus-borg" / "borg-versions.json").is_file()
    # The same file (size and mtime) is not run again ...
    stamp = fake.stat().st_mtime_ns
    fake.write_text("#!/bin/sh\nexit 9 # same size as before\n"[: len(fake.read_text())])
    os.utime(fake, ns=(stamp, stamp))
    assert borg.Borg(borg.Secrets(), binary=str(fake)).version == "1.4.5"
    # ... but another one is.
    fake.write_text("#!/bin/sh\necho 'borg 1.2.8'\n")
    with pytest.raises(UserError, match=r"borg 1\.2\.8; incus-borg needs borg 1\.4"):
        _ = borg.Borg(borg.Secrets(), binary=str(fake)).version


def test_every_command_says_what_it_does() -> None:
    done = run_cli("--help")
    assert done.returncode == 0
    commands = ["init", "list", "config", "backup", "hook", "restore"]
    for command in commands:
        assert command in done.stdout
        help_text = run_cli(command, "--help")
        assert help_text.returncode == 0, help_text.stderr


def test_a_deferred_signal_arrives_when_the_step_is_done() -> None:
    steps = []
    with pytest.raises(KeyboardInterrupt), signals.interruptible():
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("finished")  # not cut in half by the signal
        steps.append("after")  # never reached: the signal was delivered on leaving
    assert steps == ["finished"]
