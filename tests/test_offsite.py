"""Offsite repositories over SSH (a real sshd on 127.0.0.1 with an append-only restricted key),
several repositories per run, secrets, prune and the restore test."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cli import PASSPHRASE, incus_config, one_line_error, run_cli, write_config
from harness.server import IncusServer
from harness.sshd import PrivateSshd

from incus_borg import mounts

NAME = "os-dir"
DATA = os.urandom(1_500_000)


@dataclass
class Env:
    """A server with one instance, an sshd serving the offsite repository, and a config."""

    server: IncusServer
    sshd: PrivateSshd
    root: Path
    config: Path

    def runs(self, label: str) -> list[str]:
        done = run_cli("list", "--json", "--repository", label, config=self.config)
        assert done.returncode == 0, done.stderr
        return [r["name"] for r in json.loads(done.stdout)[label]]

    def assert_released(self) -> None:
        assert self.server.state(NAME) == "Running"
        assert not mounts.mounts_below(self.root / "staging")
        assert not (self.root / "staging.journal").exists()


@pytest.fixture(scope="module")
def env(incus_server: IncusServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("offsite")
    sshd = PrivateSshd(root / "sshd")
    sshd.start()
    incus_server.launch(NAME, files={"/root/data.bin": (DATA, 1000, 1000, 0o640)})
    repositories = [
        {"path": str(root / "repo"), "label": "local"},
        {
            "path": sshd.url("offsite"),
            "label": "offsite",
            "ssh_command": sshd.ssh_command,
            "append_only": True,
        },
    ]
    config = incus_config(incus_server, root, repositories=repositories, instances=[NAME])
    done = run_cli("init", config=config)
    assert done.returncode == 0, done.stderr
    try:
        yield Env(incus_server, sshd, root, config)
    finally:
        sshd.stop()
        incus_server.delete(NAME)


def test_init_writes_private_key_exports_and_refuses_plain_ssh(env: Env, tmp_path: Path) -> None:
    for label in ("local", "offsite"):
        export = env.root / f"{label}.borg-key"
        assert stat.S_IMODE(export.stat().st_mode) == 0o600
    data = {"repositories": [{"path": env.sshd.url("plain"), "ssh_command": env.sshd.ssh_command}]}
    error = one_line_error(run_cli("init", config=write_config(tmp_path / "c.yaml", data)))
    assert "no passphrase is configured" in error and "encryption: none" in error
    paper = run_cli("key", "export", "--paper", "--repository", "offsite", config=env.config)
    assert paper.returncode == 0 and "BORG PAPER KEY" in paper.stdout


def test_backup_to_both_then_restore_from_offsite(env: Env) -> None:
    done = run_cli("backup", config=env.config)
    assert done.returncode == 0, done.stderr
    run = env.runs("local")[-1]
    assert env.runs("offsite")[-1] == run
    before = env.server.checksums(NAME)
    env.server.delete(NAME)
    restored = run_cli(
        "restore",
        "instance",
        "latest",
        NAME,
        "--repository",
        "offsite",
        "--start",
        config=env.config,
    )
    assert restored.returncode == 0, restored.stderr
    assert env.server.checksums(NAME) == before
    assert env.server.owner(NAME, "/root/data.bin") == (1000, 1000)
    env.assert_released()


def test_offsite_down_is_a_warning(env: Env) -> None:
    before = env.runs("local")
    env.sshd.stop()
    try:
        done = run_cli("backup", config=env.config)
    finally:
        env.sshd.start()
    assert done.returncode == 1, done.stderr
    assert "offsite" in done.stderr and "cannot reach repository offsite" in done.stderr
    assert "connection failed, retrying" in done.stderr  # bounded retries before giving up
    assert len(env.runs("local")) == len(before) + 1
    env.assert_released()


def test_passphrase_never_in_argv_or_logs(env: Env) -> None:
    argv = [sys.executable, "-m", "incus_borg", "-c", str(env.config), "backup", "--progress"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = 0
    while proc.poll() is None:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            seen += 1
            assert PASSPHRASE not in text, text
        time.sleep(0.01)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert seen > 100
    logs = [out, err, (env.sshd.root / "sshd.log").read_text()]
    logs.append(env.server.daemon.logfile.read_text())
    assert not [log for log in logs if PASSPHRASE in log]


def test_prune_keeps_runs_and_append_only_keeps_data(env: Env, tmp_path: Path) -> None:
    for _ in range(2):
        assert run_cli("backup", config=env.config).returncode in (0, 1)
    data = yaml.safe_load(env.config.read_text())
    data["retention"] = {"keep_daily": 1, "keep_weekly": 0, "keep_monthly": 0}
    write_config(env.config, data)
    served = env.sshd.repos / "offsite"
    before = env.runs("offsite")
    last_good = int((served / "transactions").read_text().splitlines()[-1].split()[1].rstrip(","))
    done = run_cli("prune", "--repository", "offsite", config=env.config)
    assert done.returncode == 1, done.stderr  # warns: space is reclaimed only by the server
    assert "append-only" in done.stderr
    assert env.runs("offsite") == [before[-1]]
    # The server's owner rolls back to the last transaction before the prune (Borg's
    # append-only recovery): every pruned run is back.
    for segment in (served / "data").rglob("*"):
        if segment.is_file() and int(segment.name) > last_good:
            segment.unlink()
    for leftover in [*served.glob("index.*"), *served.glob("hints.*"), *served.glob("integrity.*")]:
        leftover.unlink()
    fresh = {**os.environ, "BORG_PASSPHRASE": PASSPHRASE, "BORG_BASE_DIR": str(tmp_path)}
    borg = str(Path(sys.executable).parent / "borg")
    listed = subprocess.run(
        [borg, "list", "--short", str(served)], env=fresh, capture_output=True, text=True
    )
    assert set(before) <= set(listed.stdout.split()), listed.stderr
    local = run_cli("prune", "--repository", "local", config=env.config)
    assert local.returncode == 0 and "compacted" in local.stdout
    assert env.runs("local") == [env.runs("local")[-1]]


def test_prune_leaves_foreign_archives(env: Env, tmp_path: Path) -> None:
    repo = env.root / "repo"
    source = tmp_path / "other"
    source.mkdir()
    (source / "f").write_text("not ours\n")
    borg = str(Path(sys.executable).parent / "borg")
    environment = {**os.environ, "BORG_PASSPHRASE": PASSPHRASE}
    subprocess.run(
        [borg, "create", f"{repo}::foreign-2000-01-01", str(source)], env=environment, check=True
    )
    assert run_cli("prune", "--repository", "local", config=env.config).returncode == 0
    names = subprocess.run(
        [borg, "list", "--short", str(repo)], env=environment, capture_output=True, text=True
    )
    assert "foreign-2000-01-01" in names.stdout


def test_check_restore_test_passes_then_names_a_damaged_instance(env: Env, tmp_path: Path) -> None:
    assert run_cli("backup", "--repository", "local", config=env.config).returncode == 0
    done = run_cli("check", "--repository", "local", "--restore-test", config=env.config)
    assert done.returncode == 0, done.stderr
    assert f"instance default/{NAME}: every file identical" in done.stdout
    damaged = tmp_path / "damaged"
    shutil.copytree(env.root / "repo", damaged)
    largest = max(
        (p for p in (damaged / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    with largest.open("r+b") as f:
        f.seek(largest.stat().st_size // 2)
        chunk = f.read(4096)
        f.seek(largest.stat().st_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    data = yaml.safe_load(env.config.read_text())
    data["repositories"] = [{"path": str(damaged), "label": "damaged"}]
    config = write_config(tmp_path / "damaged.yaml", data)
    broken = run_cli(
        "check", "--restore-test", config=config, env={"BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
    )
    error = one_line_error(broken)
    assert f"instance default/{NAME}" in error
    projects = env.server.daemon.query("/1.0/projects")
    assert not [p for p in projects if "incus-borg-check" in p]
