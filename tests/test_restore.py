"""`incus-borg restore instance|volume|config|files` against the session's private incusd.

One backup (module fixture) of a server holding known content; each test deletes or
changes something, restores it through the real command line and compares with what was
there before. Everything created here is named `rs-...` and removed at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli import borg, incus_config, one_line_error, run_cli
from harness.incusd import cmdline
from harness.server import (
    BTRFS_POOL,
    DEFAULT_POOL,
    SECOND_PROJECT,
    IncusServer,
    unique_bridge_name,
)
from phases import command, paused, signal_and_resume

from incus_borg.borg import Borg, Secrets
from incus_borg.config import load as load_config
from incus_borg.errors import UserError
from incus_borg.incus import Incus
from incus_borg.restore import instance as instance_kind
from incus_borg.restore.journal import RestoreJournal
from incus_borg.restore.source import Source, open_source

pytestmark = pytest.mark.incus

PREFIX = "rs-"
NETWORK_PREFIX = "rsn"  # bridges: at most 15 characters, unique on the host
DATA = os.urandom(200_000)
BLOCK = os.urandom(1 << 20)
BLOCK_LATER = os.urandom(1 << 20)
MANY_FILES = 3200  # enough for a restore to cut the extraction in two
FILES = {
    "/root/data.bin": (DATA, 0, 0, 0o600),
    "/home/user/owned.txt": (b"owned by 1000\n", 1000, 1000, 0o640),
    "/home/user/deep/nested.txt": (b"nested\n", 1000, 1000, 0o600),
}


@dataclass
class Env:
    """The server, the backup's config, and what the server held when it was backed up."""

    server: IncusServer
    config: Path
    root: Path
    run: str
    sums: dict[str, dict[str, str]] = field(default_factory=dict)  # instance -> checksums
    shown: dict[str, dict[str, Any]] = field(default_factory=dict)  # instance -> config
    disk: dict[str, dict[str, tuple[Any, ...]]] = field(default_factory=dict)  # on-disk trees
    profiles: dict[str, str] = field(default_factory=dict)  # name -> `incus profile show`
    network: str = ""  # a managed bridge of ours

    @property
    def incus_dir(self) -> Path:
        return Path(self.server.daemon.incus_dir)

    def incus(self, *args: str) -> str:
        return self.server.daemon.incus(*args).stdout

    def cli(self, *args: str) -> Any:
        return run_cli(*args, config=self.config)


# --- what a server holds, comparable before and after ----------------------------------------


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry below `root`: content digest (files) or link target, owner and mode."""
    entries: dict[str, tuple[Any, ...]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        if path.is_symlink():
            what = "-> " + os.readlink(path)
        elif path.is_file():
            what = sha(path)
        else:
            what = "dir"
        entries[str(path.relative_to(root))] = (what, st.st_uid, st.st_gid, st.st_mode & 0o7777)
    return entries


def without_mode(entries: dict[str, tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
    """A `tree` without the modes."""
    return {path: entry[:3] for path, entry in entries.items()}


def custom_dir(env: Env, name: str, snap: str | None = None) -> Path:
    """Where the `dir` pool keeps a custom volume (or one of its snapshots)."""
    pool = env.incus_dir / "storage-pools" / DEFAULT_POOL
    if snap is None:
        return pool / "custom" / f"default_{name}"
    return pool / "custom-snapshots" / f"default_{name}" / snap


def shown(env: Env, name: str) -> dict[str, Any]:
    """An instance's expanded devices, profiles and non-volatile config."""
    data = yaml.safe_load(env.incus("config", "show", name, "--expanded"))
    config = {k: v for k, v in data["config"].items() if not k.startswith("volatile.")}
    return {"devices": data["devices"], "profiles": data["profiles"], "config": config}


def profile_show(env: Env, name: str) -> dict[str, Any]:
    data = yaml.safe_load(env.incus("profile", "show", name))
    data.pop("used_by", None)
    return dict(data)


def inventory(env: Env) -> dict[str, Any]:
    """Names of everything a failed restore must not have changed."""
    query = env.server.daemon.query
    return {
        "instances": sorted(
            (i["project"], i["name"], i["status"])
            for i in query("/1.0/instances?recursion=1&all-projects=true")
        ),
        "volumes": {
            pool: sorted(
                v["name"]
                for v in query(
                    f"/1.0/storage-pools/{pool}/volumes/custom?all-projects=true&recursion=1"
                )
            )
            for pool in env.server.pools
        },
        "profiles": sorted(query("/1.0/profiles")),
        "networks": sorted(n["name"] for n in query("/1.0/networks?recursion=1") if n["managed"]),
        "projects": sorted(query("/1.0/projects")),
        "sums": env.server.checksums("rs-dir"),
    }


def remove_ours(server: IncusServer) -> None:
    """Delete every instance, volume and profile named rs-... (whatever a test left)."""
    query = server.daemon.query
    for inst in query("/1.0/instances?recursion=1&all-projects=true"):
        if inst["name"].startswith(PREFIX):
            server.delete(inst["name"], project=inst["project"])
    for pool in server.pools:
        for vol in query(f"/1.0/storage-pools/{pool}/volumes/custom?recursion=1&all-projects=true"):
            if vol["name"].startswith(PREFIX) and "/" not in vol["name"]:
                server.daemon.incus(
                    "storage", "volume", "delete", pool, vol["name"], "--project", vol["project"]
                )
    for url in query("/1.0/profiles"):
        name = url.rsplit("/", 1)[-1]
        if name.startswith(PREFIX):
            server.daemon.incus("profile", "delete", name)
    for network in query("/1.0/networks?recursion=1"):  # managed: the host's are listed too
        if network["managed"] and network["name"].startswith(NETWORK_PREFIX):
            server.daemon.incus("network", "delete", network["name"])


@pytest.fixture(scope="module")
def env(incus_server: IncusServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    server = incus_server
    incus = server.daemon.incus
    root = tmp_path_factory.mktemp("restore")
    shared = root / "shared"
    shared.mkdir()
    remove_ours(server)
    try:
        yield fill_and_back_up(server, root, shared)
    finally:
        remove_ours(server)
        incus("profile", "list")  # the daemon still answers


def fill_and_back_up(server: IncusServer, root: Path, shared: Path) -> Env:
    """Create the rs-... content, record it, and back the server up once."""
    incus = server.daemon.incus
    # Profiles: one used by rs-dir, one unused that a test deletes, one a test changes, one
    # for rs-p2; and a managed network of ours.
    network = unique_bridge_name(NETWORK_PREFIX)
    server.daemon.bridges.add(network)  # teardown deletes the host interface in any case
    for line in (
        "profile create rs-extra",
        "profile set rs-extra user.extra=yes environment.EXTRA=1",
        f"profile device add rs-extra shared disk source={shared} path=/mnt/shared readonly=true",
        "profile create rs-gone",
        "profile set rs-gone user.note=hello limits.processes=500",
        f"profile device add rs-gone eth1 nic network={server.bridge} name=eth1",
        f"profile device add rs-gone data disk source={shared} path=/srv",
        "profile create rs-kept",
        "profile set rs-kept user.note=archived",
        "profile create rs-p2prof",
        "profile set rs-p2prof user.p2=yes",
        f"network create {network} ipv4.address=none ipv6.address=none",
        f"network set {network} bridge.mtu=1400 user.note=ours",
        # rs-dir: running on the dir pool, with uid-1000 files, an extra profile and device.
        f"init {server.image} rs-dir --storage {DEFAULT_POOL} --profile default --profile rs-extra",
        "config set rs-dir user.comment=restore-me",
        "config device add rs-dir null2 unix-char source=/dev/null path=/dev/null2",
        # rs-p2: in project `second`, which uses the default project's profiles.
        f"init {server.image} rs-p2 --storage {DEFAULT_POOL} --project {SECOND_PROJECT} "
        "--profile default --profile rs-p2prof",
    ):
        incus(*line.split())
    for path, spec in FILES.items():
        server.push_file("rs-dir", path, *spec)
    server.start("rs-dir")

    server.push_file("rs-p2", "/home/user/p2", b"p2\n", 1000, 1000, project=SECOND_PROJECT)
    server.start("rs-p2", project=SECOND_PROJECT)

    # rs-fast: running on btrfs, with a user snapshot holding other content than now.
    server.launch("rs-fast", pool=BTRFS_POOL, files={"/root/v": (b"one\n", 1000, 1000, 0o644)})
    snap_sums = server.checksums("rs-fast")
    incus("snapshot", "create", "rs-fast", "snap1")
    server.push_file("rs-fast", "/root/v", b"two\n")
    server.push_file("rs-fast", "/root/only-now", b"after the snapshot\n")

    # rs-vol: a filesystem volume written from inside a container (shifted on disk), with a
    # snapshot; rs-blk: a block volume with a snapshot. Both detached when backed up.
    incus("storage", "volume", "create", DEFAULT_POOL, "rs-vol")
    incus("storage", "volume", "attach", DEFAULT_POOL, "rs-vol", "rs-dir", "/mnt/vol")
    server.exec(
        "rs-dir",
        "sh",
        "-c",
        "mkdir /mnt/vol/d && echo first > /mnt/vol/d/file && chown -R 1000:1000 /mnt/vol/d",
    )
    incus("storage", "volume", "snapshot", "create", DEFAULT_POOL, "rs-vol", "vs1")
    server.exec("rs-dir", "sh", "-c", "echo second > /mnt/vol/d/file && echo new > /mnt/vol/top")
    incus("storage", "volume", "detach", DEFAULT_POOL, "rs-vol", "rs-dir")
    incus("storage", "volume", "create", DEFAULT_POOL, "rs-blk", "--type=block", "size=4MiB")
    # rs-many: stopped, with enough files that a restore cuts it into parallel extractions,
    # hard links across its directories and directories with their own mtimes.
    server.launch("rs-many", start=False)
    fill_many(server.daemon.incus_dir / "storage-pools" / DEFAULT_POOL / "containers" / "rs-many")
    config = incus_config(server, root)
    env = Env(server, config, root, run="")
    with custom_dir(env, "rs-blk").joinpath("root.img").open("r+b") as f:
        f.write(BLOCK)
    incus("storage", "volume", "snapshot", "create", DEFAULT_POOL, "rs-blk", "bs1")
    with custom_dir(env, "rs-blk").joinpath("root.img").open("r+b") as f:
        f.write(BLOCK_LATER)

    env.sums = {
        "rs-dir": server.checksums("rs-dir"),
        "rs-fast": server.checksums("rs-fast"),
        "rs-fast/snap1": snap_sums,
    }
    env.shown = {name: shown(env, name) for name in ("rs-dir", "rs-fast")}
    env.disk = {
        "rs-vol": tree(custom_dir(env, "rs-vol")),
        "rs-vol/vs1": tree(custom_dir(env, "rs-vol", "vs1")),
        "rs-blk": tree(custom_dir(env, "rs-blk")),
        "rs-blk/bs1": tree(custom_dir(env, "rs-blk", "bs1")),
    }
    env.profiles = {name: env.incus("profile", "show", name) for name in ("rs-gone", "rs-kept")}
    env.sums["second/rs-p2"] = server.checksums("rs-p2", project=SECOND_PROJECT)
    env.network = network
    env.profiles[network] = env.incus("network", "show", network)
    assert env.cli("init").returncode == 0
    done = env.cli("backup", "--json")
    assert done.returncode == 0, done.stderr
    env.run = json.loads(done.stdout)["run"]
    return env


def fill_many(container: Path) -> None:
    """Files in four directories, a hard link across two of them, set directory mtimes."""
    rootfs = container / "rootfs"
    for d in range(4):
        for i in range(MANY_FILES // 4):
            path = rootfs / "srv" / f"d{d}" / f"s{i // 100}" / f"f{i}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(64 + i % 500))
    os.link(rootfs / "srv" / "d0" / "s0" / "f1", rootfs / "srv" / "d3" / "linked")
    for n, directory in enumerate(sorted(p for p in rootfs.rglob("*") if p.is_dir())):
        os.utime(directory, ns=(1_600_000_000_000_000_000, 1_600_000_000_123_456_789 + n))


def mtimes(root: Path) -> dict[str, int]:
    """mtime (ns) of every directory below `root`."""
    return {str(p.relative_to(root)): p.lstat().st_mtime_ns for p in root.rglob("*") if p.is_dir()}


def extract_run(env: Env, dest: Path) -> Path:
    """`borg extract` the run's server archive and all its part archives into `dest`."""
    dest.mkdir()
    repo = env.root / "repo"
    names = [a["name"] for a in json.loads(borg("list", "--json", str(repo)).stdout)["archives"]]
    for name in names:
        if name == env.run or name.startswith(env.run + "@"):
            borg("extract", "--numeric-ids", f"{repo}::{name}", cwd=dest)
    return dest


def snapshots(env: Env, name: str) -> list[str]:
    return [
        s.rsplit("/", 1)[-1] for s in env.server.daemon.query(f"/1.0/instances/{name}/snapshots")
    ]


def volume_config(env: Env, name: str) -> dict[str, Any]:
    data = env.server.daemon.query(f"/1.0/storage-pools/{DEFAULT_POOL}/volumes/custom/{name}")
    return {k: data[k] for k in ("config", "content_type", "description")}


# --- instance ----------------------------------------------------------------------------------


def test_instance_comes_back_running_as_it_was(env: Env) -> None:
    extra = profile_show(env, "rs-extra")
    env.server.delete("rs-dir")
    env.incus("profile", "delete", "rs-extra")  # the restore recreates it from the archive
    done = env.cli("restore", "instance", "latest", "rs-dir", "--start")
    assert done.returncode == 0, done.stderr
    assert env.server.wait_state("rs-dir", "Running")
    assert env.server.checksums("rs-dir") == env.sums["rs-dir"]
    assert env.server.owner("rs-dir", "/home/user/owned.txt") == (1000, 1000)
    assert env.server.owner("rs-dir", "/home/user/deep") == (1000, 1000)
    assert shown(env, "rs-dir") == env.shown["rs-dir"]
    assert profile_show(env, "rs-extra") == extra
    assert "profile default/rs-extra: created" in done.stdout


def test_instance_beside_the_original_on_another_pool(env: Env) -> None:
    original = inventory(env)
    done = env.cli("restore", "instance", "latest", "rs-dir", "--as", "rs-copy", "--pool", "fast")
    assert done.returncode == 0, done.stderr
    assert "left stopped" in done.stdout
    env.server.start("rs-copy")
    assert env.server.checksums("rs-copy") == env.sums["rs-dir"]
    assert env.server.owner("rs-copy", "/home/user/owned.txt") == (1000, 1000)
    copy = shown(env, "rs-copy")
    assert copy["devices"]["root"]["pool"] == BTRFS_POOL
    expected = env.shown["rs-dir"]
    assert copy["profiles"] == expected["profiles"] and copy["config"] == expected["config"]
    assert {k: v for k, v in copy["devices"].items() if k != "root"} == {
        k: v for k, v in expected["devices"].items() if k != "root"
    }
    assert (env.incus_dir / "storage-pools" / BTRFS_POOL / "containers" / "rs-copy").is_dir()
    after = inventory(env)
    assert after["sums"] == original["sums"] == env.sums["rs-dir"]
    assert ("default", "rs-dir", "Running") in after["instances"]
    assert shown(env, "rs-dir") == env.shown["rs-dir"]
    env.server.delete("rs-copy")


def test_large_instance_is_extracted_in_parallel_exactly(env: Env) -> None:
    containers = env.incus_dir / "storage-pools" / DEFAULT_POOL / "containers"
    done = env.cli("restore", "instance", env.run, "rs-many", "--as", "rs-many2")
    assert done.returncode == 0, done.stderr
    assert "by 2 borg extraction(s) and checked" in done.stdout
    original, copy = containers / "rs-many" / "rootfs", containers / "rs-many2" / "rootfs"
    assert tree(copy) == tree(original)
    assert mtimes(copy) == mtimes(original)
    linked = copy / "srv" / "d3" / "linked"
    assert linked.stat().st_ino == (copy / "srv" / "d0" / "s0" / "f1").stat().st_ino
    assert not list(copy.rglob(".incus-borg-*"))
    env.server.start("rs-many2")
    env.server.delete("rs-many2")


def test_instance_streamed_through_incus_import(env: Env) -> None:
    done = env.cli("restore", "instance", env.run, "rs-fast", "--as", "rs-streamed", "--stream")
    assert done.returncode == 0, done.stderr
    assert "borg extraction" not in done.stdout
    assert snapshots(env, "rs-streamed") == ["snap1"]
    env.server.start("rs-streamed")
    assert env.server.checksums("rs-streamed") == env.sums["rs-fast"]
    env.server.delete("rs-streamed")


def test_failed_extraction_leaves_nothing_behind(env: Env) -> None:
    class FailingSource:
        """The run, whose data extraction fails."""

        def __init__(self, inner: Source) -> None:
            self.inner = inner
            self.manifest = inner.manifest
            self.description = inner.description

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def extract_all(self, item: Any, extractions: Any) -> None:
            raise UserError("extraction failed")

    before = inventory(env)
    config, _ = load_config(str(env.config))
    repo = config.repositories[0]
    source = open_source(env.run, Borg(Secrets.from_config(config)), repo)
    with pytest.raises(UserError, match="extraction failed"):
        instance_kind.restore(
            Incus(env.incus_dir),
            FailingSource(source),
            instance_kind.InstanceOptions("rs-dir", new_name="rs-failed"),
            RestoreJournal(env.root / "restore-journal"),
        )
    assert inventory(env) == before
    assert not (
        env.incus_dir / "storage-pools" / DEFAULT_POOL / "containers" / "rs-failed"
    ).exists()


def test_sigterm_during_extraction_leaves_nothing_behind(env: Env) -> None:
    """SIGTERM to incus-borg alone while its borgs extract: they are stopped, the new
    instance is deleted, and the server is as before."""
    before = inventory(env)
    argv = command(env.config, "restore", "instance", env.run, "rs-many", "--as", "rs-term")
    with paused(argv, "restore-extracting") as proc:
        signal_and_resume(proc, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert "interrupted" in stderr
    assert inventory(env) == before
    assert not (env.incus_dir / "storage-pools" / DEFAULT_POOL / "containers" / "rs-term").exists()
    repo = str(env.root / "repo")
    left = [
        cmdline(int(p.name))
        for p in Path("/proc").glob("[0-9]*")
        if repo in " ".join(cmdline(int(p.name)))
    ]
    assert not left, left


def test_btrfs_instance_with_its_snapshot(env: Env) -> None:
    env.server.delete("rs-fast")
    done = env.cli("restore", "instance", "latest", "rs-fast", "--start")
    assert done.returncode == 0, done.stderr
    assert snapshots(env, "rs-fast") == ["snap1"]
    assert env.server.checksums("rs-fast") == env.sums["rs-fast"]
    assert shown(env, "rs-fast") == env.shown["rs-fast"]
    env.incus("copy", "rs-fast/snap1", "rs-snapcopy")
    env.server.start("rs-snapcopy")
    assert env.server.checksums("rs-snapcopy") == env.sums["rs-fast/snap1"]
    assert env.server.owner("rs-snapcopy", "/root/v") == (1000, 1000)
    env.server.delete("rs-snapcopy")


def test_instance_in_another_project_gets_its_profile_back(env: Env) -> None:
    env.server.delete("rs-p2", project=SECOND_PROJECT)
    env.incus("profile", "delete", "rs-p2prof")  # `second` takes its profiles from default
    done = env.cli("restore", "instance", "latest", "second/rs-p2", "--start")
    assert done.returncode == 0, done.stderr
    assert "profile default/rs-p2prof: created" in done.stdout
    assert env.server.checksums("rs-p2", project=SECOND_PROJECT) == env.sums["second/rs-p2"]
    assert env.server.owner("rs-p2", "/home/user/p2", project=SECOND_PROJECT) == (1000, 1000)


# --- volume ------------------------------------------------------------------------------------


def test_volumes_with_snapshots(env: Env) -> None:
    configs = {name: volume_config(env, name) for name in ("rs-vol", "rs-blk")}
    for name in ("rs-vol", "rs-blk"):
        env.incus("storage", "volume", "delete", DEFAULT_POOL, name)
        done = env.cli("restore", "volume", "latest", f"{DEFAULT_POOL}/{name}")
        assert done.returncode == 0, done.stderr
        assert "with 1 snapshot(s)" in done.stdout
        assert volume_config(env, name) == configs[name]
    for key, digest in env.disk.items():
        name, _, snap = key.partition("/")
        got = tree(custom_dir(env, name, snap or None))
        if name == "rs-blk":  # Incus's import writes root.img 0644 whatever the tar says
            got, digest = without_mode(got), without_mode(digest)
        assert got == digest, key
    # Read from inside a container: the owner is 1000 again, not shifted twice.
    env.incus("storage", "volume", "attach", DEFAULT_POOL, "rs-vol", "rs-dir", "/mnt/vol")
    try:
        assert env.server.exec("rs-dir", "cat", "/mnt/vol/d/file").stdout == "second\n"
        assert env.server.owner("rs-dir", "/mnt/vol/d/file") == (1000, 1000)
    finally:
        env.incus("storage", "volume", "detach", DEFAULT_POOL, "rs-vol", "rs-dir")
    assert tree(custom_dir(env, "rs-vol")) == env.disk["rs-vol"]


# --- config ------------------------------------------------------------------------------------


def test_profiles_come_back_and_existing_ones_are_left_alone(env: Env) -> None:
    default = profile_show(env, "default")
    env.incus("profile", "delete", "rs-gone")
    env.incus("profile", "set", "rs-kept", "user.note=changed")
    done = env.cli("restore", "config", "latest", "--profiles")
    assert done.returncode == 0, done.stderr
    assert "profile default/rs-gone: created" in done.stdout
    assert "profile default/rs-kept: exists, left alone" in done.stdout
    archived = yaml.safe_load(env.profiles["rs-gone"])
    archived.pop("used_by", None)
    assert profile_show(env, "rs-gone") == archived
    assert profile_show(env, "rs-kept")["config"]["user.note"] == "changed"
    assert profile_show(env, "default") == default

    done = env.cli("restore", "config", "latest", "--profiles", "--replace", "rs-kept")
    assert done.returncode == 0, done.stderr
    assert "profile default/rs-kept: replaced" in done.stdout
    assert env.incus("profile", "show", "rs-kept") == env.profiles["rs-kept"]
    assert profile_show(env, "rs-gone") == archived
    assert profile_show(env, "default") == default


def test_network_comes_back(env: Env) -> None:
    env.incus("network", "delete", env.network)
    done = env.cli("restore", "config", "latest", "--networks", env.network)
    assert done.returncode == 0, done.stderr
    assert env.incus("network", "show", env.network) == env.profiles[env.network]


# --- files -------------------------------------------------------------------------------------


def test_files_keep_content_and_owner_as_inside(env: Env, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    done = env.cli(
        "restore", "files", "latest", "rs-dir", "/home/user", "/root/data.bin", "--to", str(dest)
    )
    assert done.returncode == 0, done.stderr
    wanted = {
        path: digest
        for path, digest in env.sums["rs-dir"].items()
        if path.startswith("/home/user/") or path == "/root/data.bin"
    }
    assert len(wanted) == 3
    for path, digest in wanted.items():
        assert sha(dest / path.lstrip("/")) == digest, path
    got = {p: (dest / p.lstrip("/")).lstat() for p in wanted}
    assert {p: (st.st_uid, st.st_gid, st.st_mode & 0o7777) for p, st in got.items()} == {
        p: (FILES[p][1], FILES[p][2], FILES[p][3]) for p in wanted
    }
    assert (dest / "home/user").stat().st_uid == 1000
    assert (dest / "home/user/deep").stat().st_uid == 1000

    vol = tmp_path / "vol"
    done = env.cli("restore", "files", "latest", f"{DEFAULT_POOL}/rs-vol", "/d", "--to", str(vol))
    assert done.returncode == 0, done.stderr
    assert (vol / "d/file").read_text() == "second\n"
    assert (vol / "d/file").stat().st_uid == 1000  # as inside, not as on disk (1001000)
    assert (vol / "d").stat().st_gid == 1000


# --- refusals ----------------------------------------------------------------------------------


def test_refusals_are_one_line_and_change_nothing(env: Env, tmp_path: Path) -> None:
    before = inventory(env)
    out = tmp_path / "out"
    cases = [
        ("instance latest rs-dir", "instance default/rs-dir already exists"),
        ("instance no-such-run rs-dir --as rs-x", "no archive 'no-such-run'"),
        ("instance latest rs-nosuch", "no instance 'rs-nosuch'"),
        ("instance latest rs-dir --as rs-x --pool nosuch", "no storage pool 'nosuch'"),
        ("instance latest rs-dir --as rs-x --project nosuch", "no project 'nosuch' here nor in"),
        ("volume latest default/rs-blk", "volume default/default/rs-blk already exists"),
        ("volume latest default/rs-nosuch", "no volume 'default/rs-nosuch'"),
        ("volume latest default/rs-blk --as rs-y --pool nosuch", "no storage pool 'nosuch'"),
        ("config latest --profiles rs-nosuch", "rs-nosuch not among"),
        (f"files latest rs-nosuch /etc --to {out}", "no instance 'rs-nosuch'"),
        (f"files latest default/rs-blk /x --to {out}", "is a block volume"),
        ("server latest", "add --yes"),
    ]
    with ThreadPoolExecutor(max_workers=6) as pool:  # refusals only read: run them together
        results = list(pool.map(lambda case: env.cli("restore", *case[0].split()), cases))
    for (line, message), done in zip(cases, results, strict=True):
        error = one_line_error(done)
        assert message in error, (line, error)
    assert inventory(env) == before
    assert not out.exists()
    error = one_line_error(
        env.cli("restore", "files", "latest", "rs-dir", "/no/such", "--to", str(out))
    )
    assert "/no/such: not in default/rs-dir" in error


# --- from a directory --------------------------------------------------------------------------


def test_restore_from_an_extracted_directory(env: Env, tmp_path: Path) -> None:
    source = extract_run(env, tmp_path / "run")
    done = env.cli("restore", "instance", str(source), "rs-dir", "--as", "rs-fromdir", "--start")
    assert done.returncode == 0, done.stderr
    assert env.server.checksums("rs-fromdir") == env.sums["rs-dir"]
    assert env.server.owner("rs-fromdir", "/home/user/owned.txt") == (1000, 1000)
    env.server.delete("rs-fromdir")

    done = env.cli("restore", "instance", str(source), "rs-fast", "--as", "rs-fromdir2")
    assert done.returncode == 0, done.stderr
    assert snapshots(env, "rs-fromdir2") == ["snap1"]
    env.server.start("rs-fromdir2")
    assert env.server.checksums("rs-fromdir2") == env.sums["rs-fast"]
    env.server.delete("rs-fromdir2")

    done = env.cli("restore", "volume", str(source), f"{DEFAULT_POOL}/rs-blk", "--as", "rs-blk2")
    assert done.returncode == 0, done.stderr
    assert without_mode(tree(custom_dir(env, "rs-blk2"))) == without_mode(env.disk["rs-blk"])
    snap = tree(custom_dir(env, "rs-blk2", "bs1"))
    assert without_mode(snap) == without_mode(env.disk["rs-blk/bs1"])
    env.incus("storage", "volume", "delete", DEFAULT_POOL, "rs-blk2")
