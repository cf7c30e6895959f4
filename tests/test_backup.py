"""`incus-borg backup` and `hook pre/post` against a private incusd and a real repository."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli import borg, incus_config, one_line_error, run_cli
from harness.incusd import children, cmdline
from harness.server import IncusServer
from phases import command, kill_9, paused, resume, signal_and_resume

from incus_borg.host import mounts

pytestmark = pytest.mark.incus

DATA = os.urandom(300_000)
BLOCK = os.urandom(1 << 20)
# The block volume's data lies between zeros longer than the export's largest chunk (2^22,
# see EXPORT_CHUNKER): the chunks that hold the export's tar headers, new in every run, then
# hold zeros and headers only, whatever the repository's chunker seed.
BLOCK_AT = 4 << 20
EXPORT_HEADERS_COST = 64 << 10  # bytes an unchanged exported block volume adds per run
OURS = [
    ("default", "bk-dir"),
    ("default", "bk-fast"),
    ("default", "bk-stopped"),
    ("second", "bk-second"),
]


@dataclass
class Env:
    """The server with known content, its config, and the first run's JSON summary."""

    server: IncusServer
    config: Path
    root: Path
    first: dict[str, Any]

    @property
    def incus_dir(self) -> Path:
        return Path(self.server.daemon.incus_dir)

    def states(self) -> dict[tuple[str, str], str]:
        return {(p, n): self.server.state(n, project=p) for p, n in OURS}


def _project(project: str) -> str | None:
    return None if project == "default" else project


@pytest.fixture(scope="module")
def env(incus_server: IncusServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    server = incus_server
    root = tmp_path_factory.mktemp("backup")
    files = {
        "/root/data.bin": (DATA, 0, 0, 0o600),
        "/home/user/owned.txt": (b"owned by 1000\n", 1000, 1000, 0o640),
    }
    server.launch("bk-dir", files=files)
    server.launch("bk-fast", pool="fast", files={"/root/v": (b"one\n", 0, 0, 0o644)})
    server.daemon.incus("snapshot", "create", "bk-fast", "snap1")
    server.push_file("bk-fast", "/root/v", b"two\n")
    server.launch("bk-stopped", files={"/root/s": (b"stopped\n", 0, 0, 0o644)}, start=False)
    server.launch("bk-second", project="second", files={"/root/p": (b"second\n", 0, 0, 0o644)})
    server.daemon.incus("storage", "volume", "create", "default", "bk-vol")
    server.daemon.incus("storage", "volume", "attach", "default", "bk-vol", "bk-dir", "/mnt/vol")
    server.exec("bk-dir", "sh", "-c", "echo volume-content > /mnt/vol/file")
    server.daemon.incus("storage", "volume", "snapshot", "create", "default", "bk-vol", "vs1")
    server.exec("bk-dir", "sh", "-c", "echo changed > /mnt/vol/file")
    server.daemon.incus(
        "storage", "volume", "create", "default", "bk-blk", "--type=block", "size=12MiB"
    )
    blk = Path(server.daemon.incus_dir) / "storage-pools/default/custom/default_bk-blk/root.img"
    with blk.open("r+b") as f:
        f.seek(BLOCK_AT)
        f.write(BLOCK)
    server.daemon.incus("storage", "volume", "snapshot", "create", "default", "bk-blk", "bs1")
    config = incus_config(server, root)
    assert run_cli("init", config=config).returncode == 0
    done = run_cli("backup", "--json", config=config)
    assert done.returncode == 0, done.stderr
    yield Env(server, config, root, json.loads(done.stdout))
    for project, name in OURS:
        server.delete(name, project=_project(project))
    for volume in ("bk-vol", "bk-blk"):
        server.daemon.incus("storage", "volume", "delete", "default", volume)


def extract_run(env: Env, run: str, dest: Path) -> Path:
    """Extract a run's server archive and every part archive into `dest`."""
    dest.mkdir(exist_ok=True)
    repo = env.root / "repo"
    names = [a["name"] for a in json.loads(borg("list", "--json", str(repo)).stdout)["archives"]]
    for name in names:
        if name == run or name.startswith(run + "@"):
            borg("extract", "--numeric-ids", f"{repo}::{name}", cwd=dest)
    return dest


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_run_holds_everything(env: Env, tmp_path: Path) -> None:
    tree = extract_run(env, env.first["run"], tmp_path / "x")
    assert 'CREATE TABLE IF NOT EXISTS "instances"' in (tree / "dumps/global.sql").read_text()
    assert (tree / "dumps/local.sql").stat().st_size > 0
    assert (tree / "host/subuid").read_text() == (env.root / "subuid").read_text()
    assert (tree / "host/subgid").exists()
    assert (tree / "database/local.db").exists() and (tree / "database/global").is_dir()
    definitions = {p.stem: p.read_text() for p in (tree / "definitions").glob("*.yaml")}
    for kind in (
        "server",
        "projects",
        "profiles",
        "networks",
        "storage-pools",
        "instances",
        "images",
    ):
        assert kind in definitions
    assert "bk-second" in definitions["instances"] and "second" in definitions["projects"]
    assert env.server.bridge in definitions["networks"]
    assert "bk-vol" in definitions["storage-volumes"]
    assert env.server.fingerprint in definitions["images"]
    incus = tree / "incus"
    assert (incus / "server.crt").exists() and (incus / "images").is_dir()
    for transient in (
        "unix.socket",
        "logs",
        "shmounts",
        "devices",
        "guestapi",
        "disks",
        "database",
    ):
        assert not (incus / transient).exists(), transient
    assert not list((incus / "storage-pools/default/containers").iterdir())

    manifest = json.loads((tree / "manifest.json").read_text())
    assert manifest["database"] == "exact" and manifest["daemon_downtime"] < 10
    items = {(i["project"], i["name"]): i for i in manifest["instances"]}
    assert items[("default", "bk-dir")]["mode"] == "freeze"
    assert items[("default", "bk-fast")]["mode"] == "snapshot"
    assert items[("default", "bk-fast")]["snapshots"] == ["snap1"]
    assert items[("default", "bk-stopped")]["state"] == "Stopped"
    assert items[("second", "bk-second")]["driver"] == "dir"

    for project, name in OURS:
        if name == "bk-stopped":
            continue
        rootfs = tree / "instances" / project / name / "backup/container/rootfs"
        for path, digest in env.server.checksums(name, project=_project(project)).items():
            assert sha(rootfs / path.lstrip("/")) == digest, (name, path)
    rootfs = tree / "instances/default/bk-dir/backup/container/rootfs"
    assert (rootfs / "home/user/owned.txt").stat().st_uid == 1000
    assert (
        tree / "instances/default/bk-stopped/backup/container/rootfs/root/s"
    ).read_bytes() == b"stopped\n"
    snapshot = tree / "instances/default/bk-fast/backup/snapshots/snap1/rootfs/root/v"
    assert snapshot.read_bytes() == b"one\n"
    assert (
        tree / "instances/default/bk-fast/backup/container/rootfs/root/v"
    ).read_bytes() == b"two\n"

    volume = tree / "volumes/default/default/bk-vol/backup"
    assert (volume / "volume/file").read_text() == "changed\n"
    assert (volume / "volume-snapshots/vs1/file").read_text() == "volume-content\n"
    assert "volume_snapshots" in (volume / "index.yaml").read_text()
    # A block volume is read through Incus's export: its stream, in the run's second archive.
    assert (
        manifest["volumes"][[v["name"] for v in manifest["volumes"]].index("bk-blk")]["reader"]
        == "export"
    )
    with tarfile.open(tree / "volumes/default/default/bk-blk/backup.tar") as stream:
        image = stream.extractfile("backup/volume.img")
        snapshot_image = stream.extractfile("backup/volume-snapshots/bs1.img")
        assert image is not None and snapshot_image is not None
        on_disk = env.incus_dir / "storage-pools/default/custom/default_bk-blk/root.img"
        assert hashlib.sha256(image.read()).hexdigest() == sha(on_disk)
        assert snapshot_image.read()[BLOCK_AT : BLOCK_AT + len(BLOCK)] == BLOCK
    assert not env.server.daemon.query("/1.0/storage-pools/default/volumes/custom/bk-blk/backups")


def assert_nothing_left(env: Env) -> None:
    """No instance frozen, no temporary snapshot, nothing mounted, no journal."""
    for project, name in OURS:
        assert env.server.state(name, project=_project(project)) != "Frozen"
        snaps = env.server.daemon.query(f"/1.0/instances/{name}/snapshots?project={project}")
        assert not [s for s in snaps if "incus-borg-" in s], snaps
    for volume in ("bk-vol", "bk-blk"):
        snaps = env.server.daemon.query(
            f"/1.0/storage-pools/default/volumes/custom/{volume}/snapshots"
        )
        assert not [s for s in snaps if "incus-borg-" in s], snaps
    staging = env.root / "staging"
    assert not mounts.mounts_below(staging)
    assert not (env.root / "staging.journal").exists()
    for path in [staging, *staging.rglob("*")] if staging.exists() else []:
        assert not path.stat().st_mode & 0o007, path


def test_after_a_run_everything_is_released(env: Env) -> None:
    assert env.states() == {
        ("default", "bk-dir"): "Running",
        ("default", "bk-fast"): "Running",
        ("default", "bk-stopped"): "Stopped",
        ("second", "bk-second"): "Running",
    }
    assert_nothing_left(env)
    windows = {i["ref"]: i["window"] for i in env.first["items"]}
    assert windows["default/bk-fast"] < 1.0  # btrfs snapshot: nothing frozen
    assert windows["default/bk-stopped"] == 0.0


def test_second_run_adds_under_one_percent(env: Env) -> None:
    done = run_cli("backup", "--json", config=env.config)
    assert done.returncode == 0, done.stderr
    second = json.loads(done.stdout)
    repo = env.root / "repo"
    info = json.loads(borg("info", "--json", f"{repo}::{second['run']}@export").stdout)
    exported = info["archives"][0]["stats"]
    in_place = second["deduplicated_bytes_added"]["local"] - exported["deduplicated_size"]
    assert in_place < 0.01 * (second["bytes_read"]["local"] - exported["original_size"])
    # Incus stamps the export time into the tar header of each block image (bk-blk and its
    # snapshot) and into the index: the chunks around those headers are new in every run.
    assert exported["deduplicated_size"] < EXPORT_HEADERS_COST
    # Files cache hits: per instance only the rewritten index.yaml (and Borg's newest file,
    # which it never caches) is read again.
    ours = [i for i in second["items"] if i["ref"].split("/")[1].startswith("bk-")]
    assert ours and all(i["changed_files"] <= 2 for i in ours), ours
    assert "file(s) not in the files cache" in done.stderr


def test_profile_gives_each_phase_its_wall_and_cpu_time(env: Env) -> None:
    """Issue 26: `--profile` prints where a run spends its time, phase by phase, each below
    the phase it ran in; --json holds the same figures by path."""
    done = run_cli("--profile", "backup", "--json", config=env.config)
    assert done.returncode == 0, done.stderr
    table = done.stderr[done.stderr.index("phase ") :].splitlines()
    assert table[0].split() == ["phase", "calls", "wall", "s", "cpu", "s", "child", "cpu", "s"]
    width = table[0].index("calls")
    labels = [line[:width].rstrip() for line in table[2:]]
    for label in ("plan", "capture", "  daemon down", "    daemon start", "read", "  quiesce"):
        assert label in labels, (label, table)
    assert labels[-1] == "total (from start)"
    summary = json.loads(done.stdout)
    profile = summary["profile"]
    in_place = [i for i in summary["items"] if i["reader"] != "export"]
    assert profile["read/quiesce"]["calls"] == len(in_place)
    assert profile["read"]["children_cpu"] > 0  # borg's CPU counts where borg ran
    assert profile["export"]["wall"] > 0  # bk-blk is read through Incus's export
    down = profile["capture/daemon down"]["wall"]
    assert abs(down - summary["daemon_downtime"]) < 0.05


def test_kill_9_while_frozen_then_next_run_recovers(env: Env) -> None:
    argv = command(env.config, "backup", "--mode", "freeze")
    with paused(argv, "held:default/bk-dir") as proc:
        assert env.states()[("default", "bk-dir")] == "Frozen"
        kill_9(proc)
    assert env.states()[("default", "bk-dir")] == "Frozen"
    done = run_cli("backup", config=env.config)
    assert done.returncode == 1, done.stderr  # a warning: leftovers were undone first
    assert "undoing them first" in done.stderr
    assert_nothing_left(env)
    assert env.states()[("default", "bk-dir")] == "Running"


def test_sigterm_undoes_everything(env: Env) -> None:
    argv = command(env.config, "backup", "--mode", "snapshot")
    with paused(argv, "held:default/bk-dir") as proc:
        assert mounts.mounts_below(env.root / "staging")
        signal_and_resume(proc, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert "interrupted" in stderr
    assert_nothing_left(env)


def test_sigterm_to_incus_borg_alone_during_first_run(env: Env, tmp_path: Path) -> None:
    """SIGTERM to incus-borg only (not to borg, as `kill` or a timeout sends it), while borg
    still has much to log: the run ends, borg is stopped, everything is released."""
    env.server.launch("bk-many")
    many = "mkdir /root/many && for i in $(seq 4000); do echo $i > /root/many/f$i; done"
    env.server.exec("bk-many", "sh", "-c", many)
    config = incus_config(env.server, tmp_path, instances=["bk-many"])
    assert run_cli("init", config=config).returncode == 0
    argv = command(config, "backup", "--mode", "freeze")
    try:
        with paused(argv, "borg-started") as proc:
            assert borg_creating(proc.pid)
            signal_and_resume(proc, signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 2, stderr
        assert not mounts.mounts_below(tmp_path / "staging")
        assert not (tmp_path / "staging.journal").exists()
        assert env.server.state("bk-many") == "Running"
    finally:
        for child in Path("/proc").glob("[0-9]*/cmdline"):
            if str(tmp_path / "repo").encode() in child.read_bytes():
                os.kill(int(child.parent.name), signal.SIGKILL)
        subprocess.run(command(config, "hook", "post"), capture_output=True, check=False)
        env.server.delete("bk-many")


def borg_creating(pid: int) -> bool:
    """Whether process `pid` has a `borg create` child running."""
    return any(
        "create" in argv and any("borg" in a for a in argv) for argv in map(cmdline, children(pid))
    )


def test_hook_pre_create_post_matches_backup(env: Env, tmp_path: Path) -> None:
    pre = run_cli("hook", "pre", config=env.config)
    try:
        assert pre.returncode == 0, pre.stderr
        staging = env.root / "staging"
        assert env.server.state("bk-dir") == "Running"  # until Borg reads it
        assert json.loads((staging / "manifest.json").read_text())["hook_mode"] is True
        blocked = run_cli("backup", config=env.config)
        assert "hook-mode backup" in one_line_error(blocked)
        repo = env.root / "repo"
        borg("create", "--numeric-ids", f"{repo}::hook-run", f"{staging}/./")
        assert run_cli("hook", "post", config=env.config).returncode == 0
    except BaseException:
        run_cli("hook", "post", "--failed", config=env.config)  # a failing test leaves nothing
        raise
    assert run_cli("hook", "post", "--failed", config=env.config).returncode == 0  # repeatable
    assert_nothing_left(env)
    hooked = tmp_path / "hook"
    hooked.mkdir()
    borg("extract", "--numeric-ids", f"{repo}::hook-run", cwd=hooked)
    backed = extract_run(env, env.first["run"], tmp_path / "backup")
    for project, name in OURS:
        sub = f"instances/{project}/{name}/backup"
        assert tree_digest(hooked / sub) == tree_digest(backed / sub), name
    for sub in ("volumes/default/default/bk-vol/backup", "definitions/profiles.yaml", "host"):
        assert tree_digest(hooked / sub) == tree_digest(backed / sub), sub
    # The Incus directory holds the same (no instance's data a second time), with the same
    # owners and modes.
    assert incus_tree(hooked) == incus_tree(backed)


def incus_tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every directory down to a pool's contents below incus/, with its owner and mode."""
    incus = root / "incus"
    found = [incus, *incus.glob("*"), *incus.glob("storage-pools/*/*"), *incus.glob("*/*")]
    return {
        str(p.relative_to(root)): (p.stat().st_uid, p.stat().st_mode)
        for p in found
        if p.is_dir() and not p.is_symlink() and not {"logs", "run"} & set(p.parts)
    }


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """Content and owner of every file below `root`, leaving out what changes per run."""
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    volatile = ("backup.yaml", "index.yaml")
    return {
        str(p.relative_to(root)): (sha(p), p.stat().st_uid)
        for p in files
        if p.name not in volatile and not p.is_symlink()
    }


def test_dry_run_changes_nothing(env: Env) -> None:
    before = borg("list", "--short", str(env.root / "repo")).stdout
    done = run_cli("backup", "--dry-run", config=env.config)
    assert done.returncode == 0, done.stderr
    assert "instance default/bk-dir on default (dir): freeze" in done.stdout
    assert borg("list", "--short", str(env.root / "repo")).stdout == before
    assert_nothing_left(env)


def test_unknown_instance_is_refused(env: Env) -> None:
    error = one_line_error(run_cli("backup", "--instance", "nosuch", config=env.config))
    assert "no instance 'nosuch'" in error


def test_incus_down(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"incus: {{dir: {tmp_path}/incus}}\nstaging_dir: {tmp_path}/staging\n")
    error = one_line_error(run_cli("backup", config=config))
    assert f"Incus is not reachable at {tmp_path}/incus/unix.socket: is incusd running?" in error


def test_missing_repository_suggests_init(env: Env, tmp_path: Path) -> None:
    config = incus_config(env.server, tmp_path)
    error = one_line_error(run_cli("backup", config=config))
    assert "run `incus-borg init`" in error
    assert_nothing_left(env)


def test_concurrent_run_is_refused_and_first_unharmed(env: Env) -> None:
    with paused(command(env.config, "backup"), "captured") as first:
        error = one_line_error(run_cli("backup", config=env.config))
        assert "another incus-borg run" in error
        resume(first)
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert_nothing_left(env)
