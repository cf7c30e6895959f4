"""Offsite repositories over SSH (a real sshd on 127.0.0.1 with an append-only restricted key),
several repositories per run, secrets, prune and the restore test."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli import PASSPHRASE, borg_env, incus_config, one_line_error, run_cli, write_config
from harness.incusd import IncusError
from harness.server import IncusServer
from harness.sshd import PrivateSshd, small_disk
from phases import command, paused, resume

from incus_borg.borg import Borg, Secrets, Stalled, check_argv, create_argv
from incus_borg.borg import runner as borg_runner
from incus_borg.config import Repository
from incus_borg.host import mounts

NAME = "os-dir"
DATA = os.urandom(1_500_000)
ROOT = Path(__file__).resolve().parent.parent
BORG = str(Path(sys.executable).parent / "borg")


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

    def assert_complete(self, label: str, run: str) -> None:
        """`run` in repository `label` holds everything it was asked for: it is one complete
        run, and its manifest names the one instance it was asked for."""
        done = run_cli("list", "--json", "--repository", label, config=self.config)
        assert done.returncode == 0, done.stderr
        listed = {r["name"]: r for r in json.loads(done.stdout)[label]}
        assert listed[run]["state"] in ("complete", "partial"), listed[run]
        done = run_cli("list", run, "--json", "--repository", label, config=self.config)
        assert done.returncode == 0, done.stderr
        assert [i["name"] for i in json.loads(done.stdout)["instances"]] == [NAME]

    def variant(self, where: Path, **offsite: Any) -> Path:
        """A configuration in `where` (where init writes its key exports) whose offsite
        repository has `offsite`'s settings."""
        data = yaml.safe_load(self.config.read_text())
        for repo in data["repositories"]:
            if repo["label"] == "offsite":
                repo.update(offsite)
        return write_config(where / "config.yaml", data)

    def offsite(self, **settings: Any) -> Repository:
        """The offsite repository, as incus-borg's runner takes it."""
        return Repository(
            path=self.sshd.url("offsite"),
            label="offsite",
            ssh_command=self.sshd.ssh_command,
            append_only=True,
            **settings,
        )


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


def test_a_full_remote_disk_is_named_and_the_local_run_completes(env: Env, tmp_path: Path) -> None:
    before = env.runs("local")
    with env.sshd.small_disk("full", "1m"):
        config = env.variant(tmp_path, path=env.sshd.url("full/r"), label="full")
        assert run_cli("init", "--repository", "full", config=config).returncode == 0
        done = run_cli("backup", config=config)
    assert done.returncode == 1, done.stderr
    assert "no space left on the server of repository full" in done.stderr
    assert "[Errno 28] No space left on device" in done.stderr
    assert "Platform" not in done.stderr
    after = env.runs("local")
    assert len(after) == len(before) + 1
    env.assert_complete("local", after[-1])
    env.assert_released()


def test_a_full_local_disk_is_named(env: Env, tmp_path: Path) -> None:
    data = yaml.safe_load(env.config.read_text())
    with small_disk(tmp_path / "disk", "1m") as disk:
        data["repositories"] = [{"path": str(disk / "r"), "label": "small"}]
        config = write_config(tmp_path / "config.yaml", data)
        assert run_cli("init", config=config).returncode == 0
        error = one_line_error(run_cli("backup", config=config))
    assert "no space left on device for repository small" in error
    assert "[Errno 28] No space left on device" in error and "Local Exception" not in error
    env.assert_released()


def test_a_moved_repository_is_named_with_how_to_accept_the_move(env: Env, tmp_path: Path) -> None:
    home = {"BORG_BASE_DIR": str(tmp_path / "home")}  # this host's memory of repositories
    assert run_cli("list", "--repository", "local", config=env.config, env=home).returncode == 0
    moved = tmp_path / "moved"
    shutil.copytree(env.root / "repo", moved)
    data = yaml.safe_load(env.config.read_text())
    data["repositories"] = [{"path": str(moved), "label": "local"}]
    config = write_config(tmp_path / "config.yaml", data)
    error = one_line_error(run_cli("list", config=config, env=home))
    assert f"this host knew it at {env.root / 'repo'}" in error
    assert "moved on purpose" in error and "BORG_RELOCATED_REPO_ACCESS_IS_OK=yes" in error
    accepted = {**home, "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
    assert run_cli("list", config=config, env=accepted).returncode == 0
    assert run_cli("list", config=config, env=home).returncode == 0  # accepted once for all


def test_a_changed_host_key_is_named_and_never_retried(env: Env) -> None:
    started = time.monotonic()
    assert run_cli("list", "--repository", "offsite", config=env.config).returncode == 0
    reachable = time.monotonic() - started
    with env.sshd.other_host_key():
        started = time.monotonic()
        done = run_cli("list", "--repository", "offsite", config=env.config)
        took = time.monotonic() - started
    error = one_line_error(done)
    assert "repository offsite" in error and "host key failed verification" in error
    assert f"[127.0.0.1]:{env.sshd.port} has changed" in error
    assert "retrying" not in done.stderr
    # Retrying would sleep 1 s, then 2 s: the refusal takes no longer than a listing.
    assert took < reachable + 2 * borg_runner.RETRY_DELAY, (took, reachable)


def test_a_lock_held_on_the_offsite_repository_is_named(env: Env, tmp_path: Path) -> None:
    """The lock is waited for before anything is quiesced: the instance's freeze window is
    short although the run waited lock_wait for the offsite repository."""
    served = env.sshd.repos / "offsite"
    # The lock is taken on the server itself, as the server's owner would.
    server_side = {**borg_env(), "BORG_BASE_DIR": str(tmp_path / "server-home")}
    holder = subprocess.Popen(
        [BORG, "with-lock", str(served), "sleep", "600"],
        env=server_side,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (served / "lock.exclusive").exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        before = env.runs("local")
        started = time.monotonic()
        config = env.variant(tmp_path, lock_wait=8)
        done = run_cli("backup", "--json", "--mode", "freeze", config=config)
        took = time.monotonic() - started
    finally:
        os.killpg(holder.pid, signal.SIGTERM)
        holder.wait()
    assert done.returncode == 1, done.stderr
    warning = next(line for line in done.stderr.splitlines() if "repository offsite" in line)
    assert "locked by another process" in warning and "waited 8 s" in warning
    assert str(served / "lock.exclusive") in warning
    assert len(env.runs("local")) == len(before) + 1
    [item] = json.loads(done.stdout)["items"]
    # The lock is waited for before anything is frozen: the window is much less than the wait.
    assert took > 8 and item["mode"] == "freeze" and item["window"] < 6, (took, item)
    env.assert_released()


def test_a_stalled_server_is_stopped_and_named(env: Env, tmp_path: Path) -> None:
    stall_timeout = 8.0  # borg may be silent for seconds at start-up on a busy machine
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "blob").write_bytes(os.urandom(24_000_000))
    repo = env.offsite(upload_ratelimit=2000)  # kiB/s: the upload lasts about 12 s
    runner = Borg(Secrets(PASSPHRASE))
    outcome: dict[str, Any] = {}

    def create() -> None:
        try:
            argv = create_argv(repo, "stalled-run", ["data"])
            runner.run(argv, repo, cwd=tmp_path, stall_timeout=stall_timeout)
        except Exception as exc:
            outcome["error"] = exc
        outcome["ended"] = time.monotonic()

    served = env.sshd.repos / "offsite" / "data"
    size = sum(p.stat().st_size for p in served.rglob("*") if p.is_file())
    thread = threading.Thread(target=create)
    thread.start()
    deadline = time.monotonic() + 60
    while sum(p.stat().st_size for p in served.rglob("*") if p.is_file()) < size + 3_000_000:
        assert thread.is_alive() and time.monotonic() < deadline, outcome
        time.sleep(0.05)
    [serve] = env.sshd.serve_pids()
    os.kill(serve, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        thread.join(timeout=60)
    finally:
        os.kill(serve, signal.SIGCONT)
    error = outcome["error"]
    assert isinstance(error, Stalled), error
    assert str(error).startswith("repository offsite (ssh://") and " stalled: " in str(error)
    took = outcome["ended"] - stopped
    assert took < stall_timeout + borg_runner.STALL_GRACE + 2, took
    deadline = time.monotonic() + 30
    while env.sshd.serve_pids():  # the server's session ends once it runs again
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert runner.run(check_argv(repo, False), repo).returncode == 0
    assert "stalled-run" not in env.runs("offsite")


def test_init_never_overwrites_the_key_export_of_another_repository(
    env: Env, tmp_path: Path
) -> None:
    export = tmp_path / "offsite.borg-key"
    shutil.copy2(env.root / "offsite.borg-key", export)  # the key of the repository at the old path
    kept = export.read_bytes()
    moved = env.variant(tmp_path, path=env.sshd.url("moved"))
    error = one_line_error(run_cli("init", config=moved))
    assert str(export) in error and "another repository" in error and "move" in error
    assert export.read_bytes() == kept
    assert not (env.sshd.repos / "moved").exists()  # nothing was created
    same = run_cli("init", config=env.variant(tmp_path))
    assert same.returncode == 0, same.stderr
    assert "repository offsite: already exists" in same.stdout
    assert export.read_bytes() == kept


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


def documented_block(name: str) -> str:
    """The shell block the offsite page (docs/offsite.md) marks with `<!-- name -->`."""
    page = (ROOT / "docs" / "offsite.md").read_text()
    blocks = re.findall(rf"<!-- {name} -->\n```sh\n(.*?)```", page, re.S)
    assert len(blocks) == 1, name
    return str(blocks[0])


def run_block(name: str, variables: dict[str, str], base_dir: Path | None = None) -> str:
    """Run a documented block with bash (-e: every step must succeed), as its reader would."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BORG_")}
    environment |= {"PATH": path, **variables}
    if base_dir is not None:
        environment["BORG_BASE_DIR"] = str(base_dir)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", documented_block(name)],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_runs_pruned_through_the_append_only_key_come_back_by_the_docs(
    env: Env, tmp_path: Path
) -> None:
    for _ in range(2):
        assert run_cli("backup", config=env.config).returncode in (0, 1)
    data = yaml.safe_load(env.config.read_text())
    data["retention"] = {"keep_daily": 1, "keep_weekly": 0, "keep_monthly": 0}
    write_config(env.config, data)
    served = env.sshd.repos / "offsite"
    before = env.runs("offsite")
    good = (served / "transactions").read_text().splitlines()[-1].split()[1].rstrip(",")
    done = run_cli("prune", "--repository", "offsite", config=env.config)
    assert done.returncode == 1, done.stderr  # warns: space is reclaimed only by the server
    assert "append-only" in done.stderr
    assert env.runs("offsite") == [before[-1]]
    # The server's owner, then root on the Incus host, follow docs/offsite.md step by step.
    printed = run_block(
        "append-only recovery: server",
        {"REPO": str(served), "GOOD": good},
        base_dir=tmp_path / "server-home",  # the server's borg: no key, its own state
    )
    run_block(
        "append-only recovery: client",
        {
            "REPOSITORY": env.sshd.url("offsite"),
            "SSH_COMMAND": env.sshd.ssh_command,
            "REPO_ID": printed.split()[-1],
        },
    )
    assert set(before) <= set(env.runs("offsite"))
    pruned = before[0]
    restored = run_cli(
        "restore",
        "instance",
        pruned,
        NAME,
        "--as",
        "os-back",
        "--repository",
        "offsite",
        "--start",
        config=env.config,
    )
    assert restored.returncode == 0, restored.stderr
    try:
        assert env.server.checksums("os-back") == env.server.checksums(NAME)
    finally:
        env.server.delete("os-back")
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
    lose_a_chunk_of(damaged, f"instances/default/{NAME}/backup/container/rootfs/root/data.bin")
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


def lose_a_chunk_of(repo: Path, path: str) -> None:
    """Delete from a repository the first chunk of the file at `path` in its newest archive
    (what a damaged disk loses), so that its damage lies in that file and nowhere else."""
    environment = borg_env() | {"BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
    borg = str(Path(sys.executable).parent / "borg")

    def run(*args: str) -> str:
        done = subprocess.run([borg, *args], env=environment, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    newest = json.loads(run("list", "--json", str(repo)))["archives"][-1]["name"]
    dump = repo.parent / "archive.json"
    run("debug", "dump-archive", f"{repo}::{newest}", str(dump))
    (item,) = [i for i in json.loads(dump.read_text())["_items"] if i["path"] == path]
    run("debug", "delete-obj", str(repo), item["chunks"][0][0].removeprefix("\x7f"))


def state(env: Env) -> str:
    """The instance's state; "Busy" while the daemon is stopped to copy its database."""
    try:
        return env.server.state(NAME)
    except IncusError:
        return "Busy"


def test_a_stalled_server_never_holds_an_instance_frozen(env: Env, tmp_path: Path) -> None:
    """SIGSTOP of the offsite `borg serve` while it receives a frozen instance: the instance
    is released when max_window passes, the run names the offsite repository as stalled and
    the local repository holds the complete run; once the server runs again, the next run
    and `check` are healthy."""
    env.server.push_file(NAME, "/root/big.bin", os.urandom(40_000_000))
    repositories = [
        {"path": str(tmp_path / "repo"), "label": "local"},
        {"path": env.sshd.url("stall"), "label": "offsite", "ssh_command": env.sshd.ssh_command,
         "upload_ratelimit": 4000},
    ]  # fmt: skip
    config = incus_config(
        env.server, tmp_path, repositories=repositories, instances=[NAME], mode="freeze",
        max_window=10,
    )  # fmt: skip
    assert run_cli("init", config=config).returncode == 0
    try:
        with paused(command(config, "backup"), f"held:default/{NAME}") as proc:
            frozen = time.monotonic()
            assert state(env) == "Frozen"
            serves = env.sshd.serve_pids()
            assert serves  # the offsite borg holds its repository's lock: it reads next
            for pid in serves:
                os.kill(pid, signal.SIGSTOP)
            resume(proc)
            while state(env) == "Frozen":
                if time.monotonic() - frozen > 10 + 5:
                    proc.kill()
                    raise AssertionError(f"held frozen past max_window: {proc.communicate()[1]}")
                time.sleep(0.05)
            released = time.monotonic() - frozen
            _, stderr = proc.communicate(timeout=120)
    finally:
        for pid in env.sshd.serve_pids():
            os.kill(pid, signal.SIGCONT)
        env.server.exec(NAME, "rm", "-f", "/root/big.bin")
    assert 10 - 3 < released < 10 + 5, released  # counted from when the test saw the freeze
    assert proc.returncode == 1, stderr
    warning = next(line for line in stderr.splitlines() if "repository offsite" in line)
    assert "stalled" in warning and "max_window" in warning
    run = json.loads(run_cli("list", "--json", "--repository", "local", config=config).stdout)
    assert [r["state"] for r in run["local"]] == ["partial"]  # `instances:` names one
    env.assert_released()
    again = run_cli("backup", config=config)
    assert again.returncode == 0, again.stderr
    assert run_cli("check", config=config).returncode == 0
