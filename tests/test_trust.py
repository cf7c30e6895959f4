"""Backup never makes things worse: a staging directory it did not make is never emptied, a
full staging disk or a strange path never leaves an instance quiesced, and a kill at any phase
of `backup`, `hook pre` or `hook post` leaves a state the next command undoes.

The kill matrix (phase x what the next command finds), backup and hook side:

| command   | killed while            | next command | outcome                                 |
|-----------|-------------------------|--------------|-----------------------------------------|
| backup    | the daemon is stopped   | backup       | daemon started, run complete, exit 1    |
| backup    | a snapshot is held      | backup       | snapshot deleted, run complete, exit 1  |
| backup    | an instance is frozen   | backup       | thawed, run complete, exit 1            |
| backup    | borg reads              | backup       | mounts gone, borg gone, run complete    |
| hook pre  | the daemon is stopped   | backup       | daemon started, run complete, exit 1    |
| hook pre  | instances are held      | backup       | all released, run complete, exit 1      |
| hook post | half of it is undone    | hook post    | the rest released, exit 0               |
| backup    | a freeze group is held  | backup       | every member thawed, exit 1             |
| backup    | a snapshot group is frozen (kernel freezer) | backup | thawed, no snapshot left, exit 1 |

(the backup rows are tests/test_scale.py::test_kill_9_in_each_phase_then_backup_again; the
group rows tests/test_groups.py::test_a_kill_in_a_group_s_window_is_undone_by_the_next_run)
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli import borg, incus_config, one_line_error, run_cli
from harness.incusd import wait_for
from harness.server import BTRFS_POOL, IncusServer
from phases import command, journal_steps, kill_9, paused, resume

from incus_borg.host import mounts

pytestmark = pytest.mark.incus

NAMES = ("tr-dir", "tr-fast")


@dataclass
class Env:
    """Two running instances (dir: frozen; btrfs: snapshotted) and a config for them."""

    server: IncusServer
    root: Path
    config: Path

    def states(self) -> dict[str, str]:
        return {name: self.server.state(name) for name in NAMES}

    def assert_released(self, staging: Path | None = None) -> None:
        assert self.states() == dict.fromkeys(NAMES, "Running")
        snaps = self.server.daemon.query(f"/1.0/instances/{NAMES[1]}/snapshots")
        assert not [s for s in snaps if "incus-borg-" in s], snaps
        assert not mounts.mounts_below(staging or self.root / "staging")
        assert self.server.daemon.running()

    def cli(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, config=config or self.config)


@pytest.fixture(scope="module")
def env(incus_server: IncusServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("trust")
    # Enough data that a first run holds tr-dir frozen long enough to be caught frozen.
    incus_server.launch(NAMES[0], files={"/root/a": (os.urandom(40_000_000), 0, 0, 0o600)})
    incus_server.launch(NAMES[1], pool=BTRFS_POOL, files={"/root/b": (b"b\n", 0, 0, 0o644)})
    config = incus_config(incus_server, root, instances=list(NAMES))
    assert run_cli("init", config=config).returncode == 0
    yield Env(incus_server, root, config)
    for name in NAMES:
        incus_server.delete(name)


# --- staging: only what incus-borg made is ever emptied ------------------------------------


def test_a_staging_dir_holding_a_repository_is_refused(env: Env, tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    backups.mkdir()
    subprocess.run(["cp", "-a", str(env.root / "repo"), str(backups / "incus-borg")], check=True)
    repos = [{"path": str(backups / "incus-borg"), "label": "local"}]
    config = incus_config(env.server, tmp_path, staging_dir=str(backups), repositories=repos)
    error = one_line_error(env.cli("backup", config=config))
    assert str(backups) in error
    assert (backups / "incus-borg" / "config").is_file()  # the repository is intact
    env.assert_released(backups)


def test_a_staging_dir_of_ordinary_files_is_refused_before_anything(
    env: Env, tmp_path: Path
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    config = incus_config(env.server, tmp_path, staging_dir=str(mine), instances=list(NAMES))
    for words in (["backup"], ["hook", "pre"], ["hook", "post"]):
        error = one_line_error(env.cli(*words, config=config))
        assert "not empty and incus-borg did not make it" in error and str(mine) in error
    assert (mine / "notes.txt").read_text() == "keep me\n"
    assert not (tmp_path / "mine.journal").exists()
    env.assert_released(mine)


def test_an_empty_staging_dir_is_taken_and_keeps_its_marker(env: Env, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    config = incus_config(env.server, tmp_path, staging_dir=str(empty), instances=list(NAMES))
    assert env.cli("init", config=config).returncode == 0
    done = env.cli("backup", config=config)
    assert done.returncode == 0, done.stderr
    assert [p.name for p in empty.iterdir()] == [".incus-borg-staging"]
    env.assert_released(empty)


def test_a_non_ascii_staging_dir_is_unmounted_exactly(env: Env, tmp_path: Path) -> None:
    staging = tmp_path / "stagé dir"
    config = incus_config(env.server, tmp_path, staging_dir=str(staging), instances=list(NAMES))
    assert env.cli("init", config=config).returncode == 0
    assert env.cli("backup", config=config).returncode == 0
    env.assert_released(staging)
    assert env.cli("hook", "pre", config=config).returncode == 0
    assert mounts.mounts_below(staging)
    assert env.cli("hook", "post", config=config).returncode == 0
    env.assert_released(staging)
    assert [p.name for p in staging.iterdir()] == [".incus-borg-staging"]


# --- a full staging disk -------------------------------------------------------------------


@pytest.fixture
def small_disk(env: Env, tmp_path: Path) -> Iterator[Path]:
    """A tmpfs with room for a run's staging (the database copy and dumps grow with the
    shared server's history) and little more; the test fills the rest."""
    database = Path(env.server.daemon.incus_dir) / "database"
    used = sum(f.stat().st_size for f in database.rglob("*") if f.is_file())
    size = 20 * 2**20 + 4 * used
    disk = tmp_path / "small"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        for point in mounts.mounts_below(disk):
            subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_full_staging_disk_while_frozen_releases_everything(
    env: Env, tmp_path: Path, small_disk: Path
) -> None:
    staging = small_disk / "staging"
    config = incus_config(
        env.server, tmp_path, staging_dir=str(staging), instances=list(NAMES), mode="freeze"
    )
    assert env.cli("init", config=config).returncode == 0
    fill = small_disk / "fill"
    with paused(command(config, "backup"), f"held:default/{NAMES[0]}") as proc:
        assert env.states()[NAMES[0]] == "Frozen"
        subprocess.run(["dd", "if=/dev/zero", f"of={fill}", "bs=1M"], capture_output=True)
        resume(proc)
        _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert "No space left on device" in stderr and "unexpected" not in stderr
    env.assert_released(staging)
    assert not journal_steps(staging)
    fill.unlink()
    again = env.cli("backup", config=config)
    assert again.returncode == 0, again.stderr
    env.assert_released(staging)


# --- kills in hook mode ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "hold"),
    [("daemon-stopped", "just-in-time"), (f"held:default/{NAMES[0]}", "whole-run")],
)
def test_hook_pre_killed_is_undone_by_the_next_backup(env: Env, phase: str, hold: str) -> None:
    staging = env.root / "staging"
    argv = command(env.config, "hook", "pre", "--mode", "freeze", "--hold", hold)
    with paused(argv, phase) as proc:
        if phase == "daemon-stopped":
            assert not env.server.daemon.running()
        else:
            assert env.states()[NAMES[0]] == "Frozen"
        kill_9(proc)
    done = env.cli("backup")
    assert done.returncode == 1, done.stderr  # a warning: the dead hook pre was undone
    assert "`hook pre` that did not finish" in done.stderr
    env.assert_released()
    assert not journal_steps(staging)


def test_hook_post_killed_half_way_is_finished_by_the_next(env: Env) -> None:
    staging = env.root / "staging"
    assert env.cli("hook", "pre", "--mode", "freeze").returncode == 0
    held = len(journal_steps(staging))
    with paused(command(env.config, "hook", "post"), "undone") as proc:
        assert 0 < len(journal_steps(staging)) < held
        kill_9(proc)
    done = env.cli("hook", "post")
    assert done.returncode == 0, done.stderr
    env.assert_released()


def test_hook_post_without_a_journal_still_unmounts(env: Env) -> None:
    staging = env.root / "staging"
    assert env.cli("hook", "pre", "--mode", "snapshot").returncode == 0
    (env.root / "staging.journal").unlink()  # lost
    assert mounts.mounts_below(staging)
    done = env.cli("hook", "post")
    assert not mounts.mounts_below(staging), done.stderr
    assert wait_for(lambda: not mounts.mounts_below(staging), 1)
    for name in NAMES:  # the snapshot the journal named cannot be found again: delete it
        snaps = env.server.daemon.query(f"/1.0/instances/{name}/snapshots")
        for snap in [s.rsplit("/", 1)[-1] for s in snaps if "incus-borg-" in s]:
            env.server.daemon.incus("snapshot", "delete", name, snap)
    env.assert_released()


def test_an_instance_that_cannot_be_quiesced_is_left_out_and_the_run_is_partial(
    env: Env, tmp_path: Path
) -> None:
    """tr-dir is stopped behind the run's back after it was planned (freeze): its freeze
    fails when its turn comes, so it is left out with a warning, and the run is partial."""
    staging = tmp_path / "staging"
    config = incus_config(env.server, tmp_path, mode="freeze")  # the whole server
    assert env.cli("init", config=config).returncode == 0
    try:
        with paused(command(config, "backup"), "captured") as proc:
            assert any(s.get("path") == str(staging / "incus") for s in journal_steps(staging))
            env.server.daemon.incus("stop", "--force", NAMES[0])
            resume(proc)
            _, stderr = proc.communicate(timeout=300)
    finally:
        env.server.start(NAMES[0])
    assert proc.returncode == 1, stderr
    assert f"instance default/{NAMES[0]} left out" in stderr
    listed = json.loads(env.cli("list", "latest", "--json", config=config).stdout)
    assert listed["partial"] is True
    failed = {i["name"]: i["failed"] for i in listed["instances"]}
    assert failed[NAMES[0]] and failed[NAMES[1]] is None
    comments = borg("list", "--format", "{comment}{NL}", str(tmp_path / "repo")).stdout
    assert comments.split("\n")[0] == "incus-borg run=partial"
