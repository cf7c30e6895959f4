"""`incus-borg restore server`: a whole lost server back, and rollbacks, on dedicated daemons."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli import borg, incus_config, one_line_error, run_cli, write_config
from harness.incusd import PrivateIncus, wait_for
from harness.server import BTRFS_POOL, DEFAULT_POOL, SECOND_PROJECT, IncusServer, prepare_server
from test_restore import tree

from incus_borg.host import mounts

pytestmark = pytest.mark.incus

Factory = Callable[[], PrivateIncus]
BIG = os.urandom(1 << 20)  # in f1 only: the bytes a test damages in the repository
FILES = {
    "/root/data.bin": (os.urandom(100_000), 0, 0, 0o600),
    "/home/user/owned.txt": (b"owned by 1000\n", 1000, 1000, 0o640),
}
RUNNING = [("default", "d1"), ("default", "f1"), (SECOND_PROJECT, "p1")]


def _project(project: str) -> str | None:
    return None if project == "default" else project


@dataclass
class Setup:
    """A dedicated daemon filled with known content, its config and repository."""

    server: IncusServer
    root: Path
    config: Path

    @property
    def daemon(self) -> PrivateIncus:
        return self.server.daemon

    @property
    def incus_dir(self) -> Path:
        return self.server.daemon.incus_dir

    def pool_path(self, pool: str, *parts: str) -> Path:
        return self.incus_dir.joinpath("storage-pools", pool, *parts)


def populate(server: IncusServer, full: bool) -> None:
    """Instances on both pools (f1 with a snapshot), a stopped one, one in project `second`,
    custom volumes with snapshots and a profile; `full` adds what only the disaster needs."""
    incus = server.daemon.incus
    for line in (
        "profile create extra",
        "profile set extra user.extra=yes environment.EXTRA=1",
        "profile device add extra null2 unix-char source=/dev/null path=/dev/null2",
        f"init {server.image} d1 --storage {DEFAULT_POOL} --profile default --profile extra",
    ):
        incus(*line.split())
    for path, spec in FILES.items():
        server.push_file("d1", path, *spec)
    server.start("d1")
    server.launch("f1", pool=BTRFS_POOL, files={"/root/v": (b"one\n", 1000, 1000, 0o644)})
    incus("snapshot", "create", "f1", "s1")
    server.push_file("f1", "/root/v", b"two\n")
    server.push_file("f1", "/root/big.bin", BIG)
    server.launch("p1", project=SECOND_PROJECT, files={"/root/p": (b"second\n", 0, 0, 0o644)})
    incus("storage", "volume", "create", DEFAULT_POOL, "v1")
    incus("storage", "volume", "attach", DEFAULT_POOL, "v1", "d1", "/mnt/v1")
    server.exec("d1", "sh", "-c", "echo first > /mnt/v1/f && chown 1000:1000 /mnt/v1/f")
    incus("storage", "volume", "snapshot", "create", DEFAULT_POOL, "v1", "vs1")
    server.exec("d1", "sh", "-c", "echo second > /mnt/v1/f")
    if not full:
        return
    server.launch("s1", files={"/root/s": (b"stopped\n", 0, 0, 0o644)}, start=False)
    incus("storage", "volume", "create", BTRFS_POOL, "vb", "--type=block", "size=4MiB")
    with (server.daemon.incus_dir / "storage-pools/fast/custom/default_vb/root.img").open(
        "r+b"
    ) as f:
        f.write(os.urandom(1 << 20))
    incus("storage", "volume", "snapshot", "create", BTRFS_POOL, "vb", "bs1")


def new_setup(factory: Factory, root: Path, full: bool = True, **config: Any) -> Setup:
    """A started, prepared and populated daemon, backed up once (the full one without a
    subgid file, so that the run holds none)."""
    daemon = factory()
    daemon.start()
    server = prepare_server(daemon)
    populate(server, full)
    setup = Setup(server, root, incus_config(server, root, **config))
    if full:
        (root / "subgid").unlink()
    done = run_cli("init", config=setup.config)
    assert done.returncode == 0, done.stderr
    done = run_cli("backup", config=setup.config)
    assert done.returncode == 0, done.stderr
    return setup


def state(setup: Setup) -> dict[str, Any]:
    """Everything the daemon knows, and the data it holds, in comparable form."""
    query = setup.daemon.query
    everywhere = "recursion=1&all-projects=true"
    instances = {}
    for inst in query(f"/1.0/instances?{everywhere}"):
        config = {k: v for k, v in inst["expanded_config"].items() if not k.startswith("volatile.")}
        instances[(inst["project"], inst["name"])] = {
            "status": inst["status"],
            "profiles": inst["profiles"],
            "devices": inst["expanded_devices"],
            "config": config,
            "snapshots": [
                s["name"]
                for s in query(
                    f"/1.0/instances/{inst['name']}/snapshots?project={inst['project']}&recursion=1"
                )
            ],
        }
    volumes = {}
    for pool in setup.server.pools:
        for vol in query(f"/1.0/storage-pools/{pool}/volumes/custom?{everywhere}"):
            volumes[(pool, vol["project"], vol["name"])] = (vol["content_type"], vol["config"])
    data = {
        ref: setup.server.checksums(name, project=_project(project))
        for ref in instances
        if instances[ref]["status"] == "Running"
        for project, name in [ref]
    }
    disk = {
        "f1/s1": tree(setup.pool_path(BTRFS_POOL, "containers-snapshots", "f1", "s1", "rootfs")),
        "v1": tree(setup.pool_path(DEFAULT_POOL, "custom", "default_v1")),
        "v1/vs1": tree(setup.pool_path(DEFAULT_POOL, "custom-snapshots", "default_v1", "vs1")),
    }
    for name, parts in (
        ("s1", ("containers", "s1", "rootfs")),
        ("vb", ("custom", "default_vb")),
        ("vb/bs1", ("custom-snapshots", "default_vb", "bs1")),
    ):
        pool = DEFAULT_POOL if name == "s1" else BTRFS_POOL
        if setup.pool_path(pool, *parts).exists():
            disk[name] = tree(setup.pool_path(pool, *parts))
    for pool in setup.server.pools:
        root = setup.pool_path(pool)
        disk[f"{pool}-layout"] = {
            str(p.relative_to(root)): tree(p)["."][1:]
            for p in [root, *root.glob("*"), *root.glob("*/*"), *root.glob("*/*/*")]
            if p.is_dir() and not p.is_symlink() and "images/" not in str(p)
        }
    return {
        "instances": instances,
        "profiles": sorted(
            (p["project"], p["name"], json.dumps(p["config"]), json.dumps(p["devices"]))
            for p in query(f"/1.0/profiles?{everywhere}")
        ),
        "networks": sorted(
            (n["name"], n["type"], json.dumps(n["config"]))
            for n in query(f"/1.0/networks?{everywhere}")
            if n["managed"]
        ),
        "projects": sorted(
            (p["name"], json.dumps(p["config"])) for p in query("/1.0/projects?recursion=1")
        ),
        "pools": sorted(
            (p["name"], p["driver"], p["status"], json.dumps(p["config"]))
            for p in query("/1.0/storage-pools?recursion=1")
        ),
        "volumes": volumes,
        "images": sorted(i["fingerprint"] for i in query(f"/1.0/images?{everywhere}")),
        "data": data,
        "disk": disk,
        "owner": setup.server.owner("d1", "/home/user/owned.txt"),
    }


def assert_same(after: dict[str, Any], before: dict[str, Any]) -> None:
    """`state` equal, with a readable message naming what differs."""
    assert after.keys() == before.keys()
    for key in before:
        if key in ("disk", "data"):
            assert after[key].keys() == before[key].keys(), key
            for name, entries in before[key].items():
                differ = {
                    p: (entries.get(p), after[key][name].get(p))
                    for p in entries.keys() | after[key][name].keys()
                    if entries.get(p) != after[key][name].get(p)
                }
                lines = [f"{p}: {was} -> {now}" for p, (was, now) in sorted(differ.items())]
                assert not differ, f"{key} {name}:\n" + "\n".join(lines)
        assert after[key] == before[key], key


def siblings(setup: Setup) -> list[str]:
    """What lies beside the Incus directory (moved-aside and failed copies)."""
    return sorted(p.name for p in setup.daemon.root.iterdir() if p.name.startswith("incus."))


def start_all(setup: Setup) -> None:
    """Start every instance that is not running (waiting for those Incus starts itself)."""
    query = setup.daemon.query
    for inst in query("/1.0/instances?recursion=1&all-projects=true"):
        if inst["status"] != "Running":
            setup.server.start(inst["name"], project=_project(inst["project"]))


# --- the disaster --------------------------------------------------------------------------------


def test_lost_incus_directory_comes_back_whole(
    private_incus_factory: Factory, tmp_path: Path
) -> None:
    setup = new_setup(private_incus_factory, tmp_path)
    daemon = setup.daemon
    start_all(setup)  # s1 too, to read its checksums
    daemon.incus("stop", "s1")
    before = state(setup)
    subuid = (tmp_path / "subuid").read_text()
    (tmp_path / "subuid").write_text("root:2000000:65536\n")  # changed since the backup

    daemon.incus("admin", "shutdown")
    assert wait_for(lambda: not daemon.running(), 30)
    for point in mounts.mounts_below(daemon.incus_dir):
        mounts.unmount(point)
    shutil.rmtree(daemon.incus_dir)

    # A filesystem mounted at the Incus directory is refused (it cannot be moved aside).
    daemon.incus_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(daemon.incus_dir)], check=True)
    try:
        error = one_line_error(run_cli("restore", "server", "latest", "--yes", config=setup.config))
        assert "is a mount point" in error
        assert not list(daemon.incus_dir.iterdir())
    finally:
        mounts.unmount(daemon.incus_dir)
    daemon.incus_dir.rmdir()

    done = run_cli("restore", "server", "latest", "--yes", config=setup.config)
    assert done.returncode == 0, done.stderr
    assert siblings(setup) == []  # nothing was there to move aside, nothing left over
    assert (tmp_path / "subuid").read_text() == subuid
    kept = [p.read_text() for p in tmp_path.glob("subuid.incus-borg-old-*")]
    assert kept == ["root:2000000:65536\n"]
    assert not list(tmp_path.glob("subgid*"))  # not in the run: left alone, not emptied

    # Incus starts again what ran when the database was copied.
    for project, name in RUNNING:
        assert setup.server.wait_state(name, "Running", project=_project(project), timeout=30)
    assert setup.server.state("s1") == "Stopped"
    assert_same(state(setup), before)
    # The image works on both pools again.
    for pool in (DEFAULT_POOL, BTRFS_POOL):
        setup.server.launch(f"new-{pool}", pool=pool)
        assert setup.server.state(f"new-{pool}") == "Running"


# --- failures roll back --------------------------------------------------------------------------


def assert_as_before(setup: Setup, before: dict[str, Any], changed: str) -> None:
    """Incus runs on the original directory: `changed` (made after the backup) is there."""
    setup.daemon.wait_ready()
    assert_same(state(setup), before)
    assert setup.server.state(changed) == "Stopped"
    assert (setup.root / "subuid").read_text() == "root:2000000:65536\n"


def after_backup_changes(setup: Setup) -> dict[str, Any]:
    """Changes the archive does not hold, so that a rollback is visible; then the state."""
    setup.daemon.incus("init", setup.server.image, "changed", "--storage", DEFAULT_POOL)
    (setup.root / "subuid").write_text("root:2000000:65536\n")
    return state(setup)


def damage_segment(repo: Path, needle: bytes) -> None:
    """Flip bytes in the repository segment holding `needle` (an unencrypted repository)."""
    for segment in sorted((repo / "data").rglob("*")):
        if not segment.is_file() or not segment.name.isdigit():
            continue
        data = bytearray(segment.read_bytes())
        at = data.find(needle)
        if at >= 0:
            data[at : at + 16] = bytes(b ^ 0xFF for b in data[at : at + 16])
            segment.write_bytes(bytes(data))
            return
    raise AssertionError("the bytes to damage are not in any segment")


def test_damaged_archive_is_refused_or_rolled_back(
    private_incus_factory: Factory, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    setup = new_setup(
        private_incus_factory,
        tmp_path,
        full=False,
        repositories=[{"path": str(repo), "label": "local", "encryption": "none"}],
    )
    before = after_backup_changes(setup)
    archives = [a["name"] for a in json.loads(borg("list", "--json", str(repo)).stdout)["archives"]]
    run = next(a for a in archives if "@" not in a)

    # Damaged data of f1: found while putting f1 back, after the directory moved.
    damage_segment(repo, BIG[1000:1064])
    done = run_cli("restore", "server", run, "--yes", config=setup.config)
    error = one_line_error(done)
    assert "borg extract failed" in error and "Data integrity error" in error, error
    assert "rolling back" in done.stdout and "is back as it was" in done.stdout
    failed = [s for s in siblings(setup) if "failed" in s]
    assert failed
    assert not [s for s in siblings(setup) if "old" in s]
    assert_as_before(setup, before, "changed")

    # A run lacking an instance's data: refused before anything is touched.
    borg(
        "recreate", "--exclude", f"instances/{SECOND_PROJECT}/p1/backup/container", f"{repo}::{run}"
    )
    error = one_line_error(run_cli("restore", "server", run, "--yes", config=setup.config))
    assert "lacks the data of second/p1" in error, error
    assert siblings(setup) == failed


def test_failing_start_rolls_back(private_incus_factory: Factory, tmp_path: Path) -> None:
    setup = new_setup(private_incus_factory, tmp_path, full=False)
    before = after_backup_changes(setup)
    marker = tmp_path / "fail-once"
    wrapper = tmp_path / "start"
    real = setup.daemon.start_command()
    # Starts Incus on the restored directory (which starts its instances), then fails: the
    # rollback must stop all that, and its own start (marker gone) succeeds.
    wrapper.write_text(
        f'#!/bin/sh\n{real} || exit 1\nif [ -e {marker} ]; then rm -f {marker}; echo "simulated start failure" >&2; exit 1; fi\n'
    )
    wrapper.chmod(0o755)
    marker.touch()
    data = yaml.safe_load(setup.config.read_text())
    data["incus"]["start_command"] = str(wrapper)
    write_config(setup.config, data)

    done = run_cli("restore", "server", "latest", "--yes", config=setup.config)
    error = one_line_error(done)
    assert "simulated start failure" in error, error
    assert not marker.exists()
    assert "is back as it was" in done.stdout
    assert_as_before(setup, before, "changed")
