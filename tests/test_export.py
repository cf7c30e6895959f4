"""The export reader, end to end on `dir` and btrfs (the drivers that run here), forced with
`user.incus-borg.mode=export`: Incus's own backup stream goes into the run's second archive
and comes back through every restore kind; the server's copy of the backup is gone after
every run and after a kill at each phase. Against the shared private Incus and a real
repository. (zfs, lvm, ceph and VMs: tests/unit/test_export_exchanges.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli import borg, incus_config, run_cli
from harness.server import BTRFS_POOL, DEFAULT_POOL, IncusServer
from phases import command, kill_9, paused, signal_and_resume

pytestmark = pytest.mark.incus

NAME = "ex-c"  # a container on the dir pool, forced to export
FAST = "ex-f"  # a container on the btrfs pool, forced to export (Incus snapshots it)
PLAIN = "ex-p"  # read in place: the reader follows each item's key
VOLUME = "ex-vol"  # its custom filesystem volume, forced to export
BLOCK = "ex-blk"  # a custom block volume on the dir pool: always exported
DATA = os.urandom(40 << 20)
BLOCK_DATA = os.urandom(1 << 20)
KEY = "user.incus-borg.mode=export"
LINKS = "mkdir -p /root/hl && echo linked > /root/hl/b && ln /root/hl/b /root/hl/a"


@dataclass
class Env:
    server: IncusServer
    root: Path
    config: Path  # NAME (and its volume), FAST and PLAIN
    first: dict[str, object]

    def backups(self) -> list[str]:
        """Every backup the server holds of the items of this module."""
        query = self.server.daemon.query
        found = [
            f"{n}: {b}" for n in (NAME, FAST, PLAIN) for b in query(f"/1.0/instances/{n}/backups")
        ]
        for pool, volume in ((DEFAULT_POOL, VOLUME), (DEFAULT_POOL, BLOCK)):
            found += query(f"/1.0/storage-pools/{pool}/volumes/custom/{volume}/backups")
        return found

    def archives(self) -> list[str]:
        listed = json.loads(borg("list", "--json", str(self.root / "repo")).stdout)
        return [a["name"] for a in listed["archives"]]

    def backup(self, *args: str, recovering: bool = False) -> dict[str, object]:
        """A run (after a killed one: it undoes what that left, with a warning, exit 1)."""
        done = run_cli("backup", "--json", *args, config=self.config)
        assert done.returncode == (1 if recovering else 0), done.stderr
        if recovering:
            assert re.search(r"left \d+ step\(s\) to undo: undoing them first", done.stderr)
        assert not self.backups()
        return dict(json.loads(done.stdout))


@pytest.fixture(scope="module")
def env(incus_server: IncusServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("export")
    server = incus_server
    incus = server.daemon.incus
    try:
        server.launch(NAME, files={"/root/data.bin": (DATA, 0, 0, 0o600)}, start=False)
        incus("storage", "volume", "create", DEFAULT_POOL, VOLUME)
        incus("storage", "volume", "attach", DEFAULT_POOL, VOLUME, NAME, "/mnt/v")
        incus("storage", "volume", "create", DEFAULT_POOL, BLOCK, "--type=block", "size=4MiB")
        image = server.daemon.incus_dir / "storage-pools" / DEFAULT_POOL / "custom"
        with (image / f"default_{BLOCK}" / "root.img").open("r+b") as f:
            f.write(BLOCK_DATA)
        incus("config", "set", NAME, KEY)
        incus("storage", "volume", "set", DEFAULT_POOL, VOLUME, KEY)
        server.start(NAME)
        server.exec(NAME, "sh", "-c", LINKS + " && echo in-volume > /mnt/v/f")
        incus("snapshot", "create", NAME, "s1")
        server.push_file(NAME, "/root/later", b"after the snapshot\n")
        server.launch(FAST, pool=BTRFS_POOL, files={"/root/v": (b"fast\n", 0, 0, 0o644)})
        incus("config", "set", FAST, KEY)
        server.launch(PLAIN, files={"/root/p": (b"plain\n", 0, 0, 0o644)})
        config = incus_config(server, root)
        assert run_cli("init", config=config).returncode == 0
        the_env = Env(server, root, config, {})
        the_env.first = the_env.backup()
        yield the_env
    finally:
        for name in (NAME, FAST, PLAIN, "ex-back", "ex-new"):
            incus("delete", "--force", name, check=False)
        for volume in (VOLUME, BLOCK, "ex-vol2", "ex-blk2"):
            incus("storage", "volume", "delete", DEFAULT_POOL, volume, check=False)


def items(summary: dict[str, object]) -> dict[str, dict[str, object]]:
    return {str(i["ref"]): i for i in summary["items"]}  # type: ignore[attr-defined]


def test_the_reader_follows_the_driver_and_the_key(env: Env) -> None:
    done = run_cli("backup", "--dry-run", config=env.config)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()

    def line(ref: str) -> str:
        return next(x for x in lines if f" {ref} on " in x)

    assert "read through Incus's export (frozen while Incus makes its backup)" in line(
        f"default/{NAME}"
    )
    assert "snapshot" in line(f"default/{FAST}") and "Incus reads a read-only snapshot" in line(
        f"default/{FAST}"
    )
    assert "read in place" in line(f"default/{PLAIN}")
    assert "read through Incus's export" in line(f"default/{BLOCK}")  # a block volume, no key
    found = items(env.first)
    assert found[f"default/{NAME}"]["reader"] == "export"
    assert found[f"default/{NAME}"]["mode"] == "freeze"
    assert found[f"default/{FAST}"]["mode"] == "snapshot"
    assert found[f"default/{PLAIN}"]["reader"] == "in place"
    status = json.loads(run_cli("status", "--json", config=env.config).stdout)
    readers = {f"{i['project']}/{i['name']}": i["reader"] for i in status["items"]}
    assert readers[f"default/{NAME}"] == "export" and readers[f"default/{PLAIN}"] == "in place"


def test_a_run_makes_two_archives_and_leaves_no_backup_on_the_server(env: Env) -> None:
    run = str(env.first["run"])
    assert env.first["archives"] == {"local": [f"{run}@export", run]}
    assert not env.backups()
    exported = borg("list", "--short", f"{env.root / 'repo'}::{run}@export").stdout.split()
    assert f"instances/default/{NAME}/backup.tar" in exported
    assert f"volumes/{DEFAULT_POOL}/default/{BLOCK}/backup.tar" in exported
    assert f"instances/default/{PLAIN}/backup.tar" not in exported


def test_an_unchanged_run_adds_under_one_percent(env: Env) -> None:
    second = env.backup()
    info = json.loads(borg("info", "--json", f"{env.root / 'repo'}::{second['run']}@export").stdout)
    added = info["archives"][0]["stats"]["deduplicated_size"]
    size = 2 * len(DATA)  # the instance and its snapshot s1 both hold data.bin
    assert added < 0.01 * size, (added, size)
    assert len(second["archives"]["local"]) == 2  # type: ignore[index]


def test_restore_instance_as_a_new_name_with_snapshot_and_hard_link(env: Env) -> None:
    done = run_cli("restore", "instance", "latest", NAME, "--as", "ex-back", "--start",
                   config=env.config)  # fmt: skip
    assert done.returncode == 0, done.stderr
    server = env.server
    sums = server.checksums("ex-back", ["/root"])
    assert sums["/root/data.bin"] == hashlib.sha256(DATA).hexdigest()
    inodes = server.exec("ex-back", "stat", "-c", "%i", "/root/hl/a", "/root/hl/b").stdout.split()
    assert len(inodes) == 2 and inodes[0] == inodes[1]
    snaps = server.daemon.query("/1.0/instances/ex-back/snapshots")
    assert [s.rsplit("/", 1)[1] for s in snaps] == ["s1"]
    server.delete("ex-back")


def test_restore_instance_onto_the_btrfs_pool(env: Env) -> None:
    done = run_cli("restore", "instance", "latest", FAST, "--as", "ex-new", "--pool",
                   DEFAULT_POOL, config=env.config)  # fmt: skip
    assert done.returncode == 0, done.stderr
    pool = env.server.daemon.query("/1.0/instances/ex-new")["expanded_devices"]["root"]["pool"]
    assert pool == DEFAULT_POOL
    env.server.delete("ex-new")


def test_restore_files_reads_inside_the_stream(env: Env, tmp_path: Path) -> None:
    done = run_cli("restore", "files", "latest", NAME, "/root/hl/a", "/root/later",
                   "--to", str(tmp_path), config=env.config)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "root/hl/a").read_text() == "linked\n"
    assert (tmp_path / "root/later").read_bytes() == b"after the snapshot\n"
    assert (tmp_path / "root/later").stat().st_uid == 0  # the owner seen inside


def test_restore_volumes_filesystem_and_block(env: Env) -> None:
    for volume, new in ((VOLUME, "ex-vol2"), (BLOCK, "ex-blk2")):
        done = run_cli("restore", "volume", "latest", f"{DEFAULT_POOL}/{volume}", "--as", new,
                       config=env.config)  # fmt: skip
        assert done.returncode == 0, done.stderr
    custom = env.server.daemon.incus_dir / "storage-pools" / DEFAULT_POOL / "custom"
    assert (custom / "default_ex-vol2/f").read_text() == "in-volume\n"
    image = (custom / "default_ex-blk2/root.img").read_bytes()
    assert image[: len(BLOCK_DATA)] == BLOCK_DATA
    for new in ("ex-vol2", "ex-blk2"):
        env.server.daemon.incus("storage", "volume", "delete", DEFAULT_POOL, new)


def test_restore_test_compares_the_exported_instance(env: Env) -> None:
    done = run_cli("check", "--restore-test", config=env.config, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"restore test: instance default/{NAME}: every file identical" in done.stdout


@pytest.mark.parametrize("phase", ["held", "export-requested", "export-streaming", "borg-started"])
def test_a_kill_in_each_phase_leaves_nothing_after_the_next_run(env: Env, phase: str) -> None:
    """Killed with the container frozen for its export, with Incus making its backup, with
    half the stream in Borg, and with Borg writing: the next run unfreezes it and deletes
    the server's backup."""
    target = f"{phase}:default/{NAME}" if phase != "borg-started" else phase
    with paused(command(env.config, "backup"), target) as proc:
        if phase in ("export-requested", "export-streaming"):
            assert env.backups()  # the server holds the backup being read
        kill_9(proc)
    env.backup(recovering=True)
    assert env.server.state(NAME) == "Running"
    assert not env.backups()


def test_sigterm_while_streaming_deletes_the_servers_backup(env: Env) -> None:
    with paused(command(env.config, "backup"), f"export-streaming:default/{NAME}") as proc:
        signal_and_resume(proc, signal.SIGTERM)
        assert proc.wait(timeout=120) == 2
    assert not env.backups()
    assert env.server.state(NAME) == "Running"


def test_hook_mode_reads_what_it_can_in_place(env: Env) -> None:
    pre = run_cli("hook", "pre", config=env.config)
    try:
        assert pre.returncode == 0, pre.stderr
        assert f"instance default/{NAME}: read in place (hook mode takes no export stream)" in (
            pre.stderr
        )
        staging = env.root / "staging"
        rootfs = staging / f"instances/default/{NAME}/backup/container/rootfs"
        assert (rootfs / "root/data.bin").stat().st_size == len(DATA)
    finally:
        post = run_cli("hook", "post", config=env.config)
    assert post.returncode == 0, post.stderr
    assert not env.backups()
