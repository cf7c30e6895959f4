"""Disaster recovery onto new hardware: `restore all` and `check --drill`.

Daemon A (built once for the module) holds a `dir` and a btrfs-loop pool, the default project
(with a key of the admin's) and three more, two of them with profiles of their own (whose
`default` profiles Incus makes, each given devices, and another profile with devices), a
profile, a managed network, instances with snapshots on each pool, containers whose files have
hard links in both orders (the link's name sorting before and after the file's first name), a
custom filesystem volume with a snapshot attached to an instance, a custom volume in a project
of its own, and a block volume with a snapshot (the block volume, and o1 by its key, are read
through Incus's export stream); it is backed up once. Daemons B run in network namespaces of
their own (A's bridge is recreated there under its own name) and hold only a `dir` pool with another name and source: each `restore all`
rebuilds A's run onto one of them through the real command line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli import incus_config, one_line_error, run_cli, write_config
from harness.incusd import PrivateIncus, wait_for
from harness.server import BTRFS_POOL, DEFAULT_POOL, SECOND_PROJECT, IncusServer, prepare_server
from phases import command, paused, resume
from test_restore import tree
from test_restore_server import damage_segment

from incus_borg.host import mounts

pytestmark = pytest.mark.incus

Factory = Callable[..., PrivateIncus]
NEW_DIR = "bpool"  # B's own dir pool, onto which A's dir pool is mapped
NEW_BTRFS = "nfast"  # the btrfs pool `restore all` creates on B for A's btrfs pool
POOL_MAP = (
    "--pool-map",
    f"{DEFAULT_POOL}={NEW_DIR}",
    "--pool-map",
    f"{BTRFS_POOL}={NEW_BTRFS}:btrfs:size=1GiB",
)
MAPPED = {DEFAULT_POOL: NEW_DIR, BTRFS_POOL: NEW_BTRFS}
BLOCK = os.urandom(1 << 20)
BIG = os.urandom(1 << 20)  # in f1 only: the bytes a test damages in the repository
FILES = {
    "/root/data.bin": (os.urandom(300_000), 0, 0, 0o600),
    "/home/user/owned.txt": (b"owned by 1000\n", 1000, 1000, 0o640),
}
# What runs at backup time, by boot.autostart.priority (highest starts first).
PRIORITY = {"f1": "20", "d1": "10"}
OWN = {"rc-own1": "o1", "rc-own2": "o2"}  # projects with profiles of their own: their container
# Hard links: `b` and its further names `a` (sorting before it) and `c` (after it).
LINKS = "mkdir -p /root/hl && echo linked > /root/hl/b && ln /root/hl/b /root/hl/a && ln /root/hl/b /root/hl/c"


@dataclass
class World:
    """Daemon A, its backup, and what it held."""

    server: IncusServer
    root: Path
    config: Path
    scratch: Path  # where drills put their scratch Incus
    sums: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    entities: dict[str, Any] = field(default_factory=dict)

    @property
    def daemon(self) -> PrivateIncus:
        return self.server.daemon


def _project(project: str) -> str | None:
    return None if project == "default" else project


def populate(server: IncusServer) -> None:
    """A's content (see the module's docstring)."""
    incus = server.daemon.incus
    for line in (
        "profile create rc-prof",
        "profile set rc-prof user.note=archived environment.RC=1",
        "profile device add rc-prof null2 unix-char source=/dev/null path=/dev/null2",
        f"init {server.image} d1 --storage {DEFAULT_POOL} --profile default --profile rc-prof",
        f"config set d1 boot.autostart.priority={PRIORITY['d1']}",
        f"storage volume create {DEFAULT_POOL} vol",
        f"storage volume attach {DEFAULT_POOL} vol d1 /mnt/vol",
        f"init {server.image} clash --storage {DEFAULT_POOL}",
        f"storage volume create {BTRFS_POOL} blk --type=block size=4MiB",
    ):
        incus(*line.split())
    for path, spec in FILES.items():
        server.push_file("d1", path, *spec)
    server.start("d1")
    server.exec("d1", "sh", "-c", LINKS)
    incus("project", "set", "default", "user.note=the admin's")
    for project in OWN:
        incus("project", "create", project, "-c", "features.profiles=true", "-c",
              "features.images=false")  # fmt: skip
        for device in (
            ["root", "disk", "path=/", f"pool={DEFAULT_POOL}"],
            ["eth0", "nic", f"network={server.bridge}", "name=eth0"],
        ):
            incus("profile", "device", "add", "default", *device, "--project", project)
        incus("profile", "set", "default", f"user.project={project}", "--project", project)
    incus("profile", "create", "rc-extra", "--project", "rc-own2")
    incus("profile", "device", "add", "rc-extra", "null3", "unix-char", "source=/dev/null",
          "path=/dev/null3", "--project", "rc-own2")  # fmt: skip
    incus("storage", "volume", "create", DEFAULT_POOL, "ovol", "--project", "rc-own2")
    for project, name in OWN.items():
        server.launch(name, project=project, files={"/root/own": (project.encode(), 0, 0, 0o600)},
                      start=False)  # fmt: skip
        if project == "rc-own1":  # read through Incus's export stream
            incus("config", "set", name, "user.incus-borg.mode=export", "--project", project)
        if project == "rc-own2":
            incus("profile", "add", name, "rc-extra", "--project", project)
            incus("storage", "volume", "attach", DEFAULT_POOL, "ovol", name, "/mnt/ovol",
                  "--project", project)  # fmt: skip
        server.start(name, project=project)
        server.exec(name, "sh", "-c", LINKS, project=project)
    server.exec("o2", "sh", "-c", "echo own > /mnt/ovol/f", project="rc-own2")
    server.exec("d1", "sh", "-c", "echo first > /mnt/vol/f && chown 1000:1000 /mnt/vol/f")
    incus("storage", "volume", "snapshot", "create", DEFAULT_POOL, "vol", "vs1")
    incus("snapshot", "create", "d1", "s1")
    server.exec("d1", "sh", "-c", "echo second > /mnt/vol/f && echo later > /root/later")
    server.launch("f1", pool=BTRFS_POOL, files={"/root/v": (b"one\n", 1000, 1000, 0o644)})
    incus("config", "set", "f1", f"boot.autostart.priority={PRIORITY['f1']}")
    incus("snapshot", "create", "f1", "fs1")
    server.push_file("f1", "/root/v", b"two\n")
    server.push_file("f1", "/root/big.bin", BIG)
    server.launch("p1", project=SECOND_PROJECT, files={"/root/p": (b"second\n", 0, 0, 0o644)})
    image = server.daemon.incus_dir / "storage-pools" / BTRFS_POOL / "custom" / "default_blk"
    with (image / "root.img").open("r+b") as f:
        f.write(BLOCK)
    incus("storage", "volume", "snapshot", "create", BTRFS_POOL, "blk", "bs1")


def entities(daemon: PrivateIncus, pools: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything a daemon defines, comparable across daemons: A's pools named as `pools`
    maps them, volatile keys and server-specific fields left out."""
    query = daemon.query
    rename = pools or {}

    def devices(found: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        return {
            name: {**d, "pool": rename.get(d["pool"], d["pool"])} if "pool" in d else d
            for name, d in found.items()
        }

    def config(found: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in found.items() if not k.startswith("volatile.")}

    everywhere = "recursion=1&all-projects=true"
    volumes = {}
    for pool in query("/1.0/storage-pools?recursion=1"):
        for vol in query(f"/1.0/storage-pools/{pool['name']}/volumes/custom?{everywhere}"):
            volumes[f"{pool['name']}/{vol['project']}/{vol['name']}"] = vol["content_type"]
    return {
        "projects": {p["name"]: p["config"] for p in query("/1.0/projects?recursion=1")},
        "profiles": {
            f"{p['project']}/{p['name']}": (config(p["config"]), devices(p["devices"]))
            for p in query(f"/1.0/profiles?{everywhere}")
        },
        "networks": {
            n["name"]: (n["type"], config(n["config"]))
            for n in query(f"/1.0/networks?{everywhere}")
            if n["managed"]
        },
        "volumes": {
            ("/".join([rename.get(k.split("/")[0], k.split("/")[0]), *k.split("/")[1:]])): v
            for k, v in volumes.items()
        },
        "instances": {
            f"{i['project']}/{i['name']}": (
                i["profiles"],
                config(i["expanded_config"]),
                devices(i["expanded_devices"]),
                sorted(s["name"] for s in i.get("snapshots") or []),
            )
            for i in query("/1.0/instances?recursion=2&all-projects=true")
        },
    }


@pytest.fixture(scope="module")
def world(
    module_incus_factory: Factory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    daemon = module_incus_factory()
    daemon.start()
    server = prepare_server(daemon)
    populate(server)
    root = tmp_path_factory.mktemp("recovery")
    repo = {"path": str(root / "repo"), "label": "local", "encryption": "none"}
    config = incus_config(server, root, repositories=[repo])  # unencrypted: one test damages it
    # Drills go below a directory that container uids may enter (pytest's are 0700).
    scratch = Path(tempfile.mkdtemp(prefix="incus-borg-test-drill-", dir="/tmp"))
    scratch.chmod(0o711)
    world = World(server, root, config, scratch)
    held = [("default", "d1"), ("default", "f1"), (SECOND_PROJECT, "p1"), *OWN.items()]
    for project, name in held:
        world.sums[(project, name)] = server.checksums(name, project=_project(project))
    world.entities = entities(daemon, MAPPED)
    assert run_cli("init", config=config).returncode == 0
    done = run_cli("backup", config=config)
    assert done.returncode == 0, done.stderr
    try:
        yield world
    finally:
        scratch.rmdir()  # fails (loudly) if a drill left anything in it


def new_b(factory: Factory) -> IncusServer:
    """A fresh daemon in a network namespace of its own, holding only a `dir` pool with
    another name and source."""
    daemon = factory(netns=True)
    daemon.start()
    source = daemon.root / "elsewhere"
    source.mkdir()
    daemon.incus("storage", "create", NEW_DIR, "dir", f"source={source}")
    return IncusServer(daemon=daemon, bridge="")


def b_config(world: World, b: IncusServer, name: str) -> Path:
    """A configuration for B reading A's repository."""
    data = yaml.safe_load(world.config.read_text())
    data["incus"]["dir"] = str(b.daemon.incus_dir)
    data["staging_dir"] = str(world.root / f"staging-{name}")
    path = world.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@dataclass
class Rebuilt:
    """B before and after a dry run, a real run (with --start) and a second run."""

    b: IncusServer
    config: Path
    before: dict[str, Any]
    dry_run: Any
    after_dry_run: dict[str, Any]
    first: Any
    after_first: dict[str, Any]
    second: Any
    after_second: dict[str, Any]
    clash_before: dict[str, Any]


def clash(b: IncusServer) -> dict[str, Any]:
    data = b.daemon.query("/1.0/instances/clash")
    return {k: data[k] for k in ("config", "devices", "profiles", "status", "created_at")}


@pytest.fixture(scope="module")
def rebuilt(world: World, module_incus_factory: Factory) -> Rebuilt:
    b = new_b(module_incus_factory)
    # B already holds an instance of one of A's names (empty, with a mark of its own).
    # (Without profiles: B's `default` profile, unused and empty, is filled from the archive.)
    b.daemon.incus(
        "init", "--empty", "clash", "--no-profiles", "--storage", NEW_DIR, "-c", "user.mine=yes"
    )
    config = b_config(world, b, "b")
    before = entities(b.daemon)
    clash_before = clash(b)
    dry_run = run_cli("restore", "all", "latest", *POOL_MAP, "--dry-run", config=config)
    after_dry_run = entities(b.daemon)
    first = run_cli("restore", "all", "latest", *POOL_MAP, "--start", config=config)
    after_first = entities(b.daemon)
    second = run_cli("restore", "all", "latest", *POOL_MAP, config=config)
    return Rebuilt(
        b,
        config,
        before,
        dry_run,
        after_dry_run,
        first,
        after_first,
        second,
        entities(b.daemon),
        clash_before,
    )


# --- restore all ---------------------------------------------------------------------------------


def test_dry_run_lists_everything_and_changes_nothing(rebuilt: Rebuilt, world: World) -> None:
    done = rebuilt.dry_run
    assert done.returncode == 0, done.stderr
    assert rebuilt.after_dry_run == rebuilt.before
    lines = done.stdout.splitlines()
    bridge = world.server.bridge
    for wanted in (
        f"create  project {SECOND_PROJECT}",
        f"exists  storage pool {DEFAULT_POOL} as {NEW_DIR}: used as it is (dir)",
        f"create  storage pool {BTRFS_POOL} as {NEW_BTRFS} (btrfs: size=1GiB)",
        f"create  network default/{bridge}",
        "create  profile default/rc-prof",
        "update  profile default/default: exists here unused",
        "update  project default: exists here as Incus makes it",
        "create  project rc-own1",
        "update  profile rc-own1/default: Incus makes it with project rc-own1",
        "update  profile rc-own2/default: Incus makes it with project rc-own2",
        "create  profile rc-own2/rc-extra",
        f"create  volume {DEFAULT_POOL}/rc-own2/ovol onto pool {NEW_DIR} (filesystem, 0 snapshot(s))",
        f"create  instance rc-own1/o1 onto pool {NEW_DIR} (0 snapshot(s), running at backup time)",
        f"create  volume {DEFAULT_POOL}/default/vol onto pool {NEW_DIR} (filesystem, 1 snapshot(s))",
        f"create  volume {BTRFS_POOL}/default/blk onto pool {NEW_BTRFS} (block, 1 snapshot(s))",
        f"create  instance default/d1 onto pool {NEW_DIR} (1 snapshot(s), running at backup time)",
        f"create  instance default/f1 onto pool {NEW_BTRFS} (1 snapshot(s), running at backup time)",
        f"create  instance {SECOND_PROJECT}/p1 onto pool {NEW_DIR}",
        "exists  instance default/clash: left alone",
    ):
        assert any(line.strip().startswith(wanted) for line in lines), (wanted, done.stdout)
    # Dependency order: what an entity needs comes before it.
    kinds = [line.split()[1] for line in lines if line.startswith("  ")]
    assert kinds.index("project") < kinds.index("storage")
    assert kinds.index("storage") < kinds.index("network") < kinds.index("profile")
    assert kinds.index("profile") < kinds.index("volume") < kinds.index("instance")


def test_every_entity_comes_back_on_b(rebuilt: Rebuilt, world: World) -> None:
    done = rebuilt.first
    assert done.returncode == 0, done.stderr
    after = rebuilt.after_first
    expected = world.entities
    for kind in ("projects", "networks", "volumes"):
        missing = {k: v for k, v in expected[kind].items() if after[kind].get(k) != v}
        assert not missing, (kind, missing, after[kind])
    assert after["profiles"] == expected["profiles"]
    for ref, value in expected["instances"].items():
        if ref != "default/clash":
            assert after["instances"][ref] == value, ref
    pools = {
        p["name"]: p["driver"] for p in rebuilt.b.daemon.query("/1.0/storage-pools?recursion=1")
    }
    assert pools == {NEW_DIR: "dir", NEW_BTRFS: "btrfs"}
    assert f"storage pool {NEW_BTRFS}: created" in done.stdout


def test_instances_run_with_equal_files_snapshots_and_volume(
    rebuilt: Rebuilt, world: World
) -> None:
    b = rebuilt.b
    for (project, name), sums in world.sums.items():
        assert b.wait_state(name, "Running", project=_project(project), timeout=30), name
        assert b.checksums(name, project=_project(project)) == sums, name
    assert b.owner("d1", "/home/user/owned.txt") == (1000, 1000)
    assert b.exec("d1", "cat", "/mnt/vol/f").stdout == "second\n"
    assert b.owner("d1", "/mnt/vol/f") == (1000, 1000)
    a_pools = world.daemon.incus_dir / "storage-pools"
    b_pools = b.daemon.incus_dir / "storage-pools"
    for pool, parts in (
        (DEFAULT_POOL, ("containers-snapshots", "d1", "s1", "rootfs")),
        (BTRFS_POOL, ("containers-snapshots", "f1", "fs1", "rootfs")),
        (DEFAULT_POOL, ("custom-snapshots", "default_vol", "vs1")),
    ):
        assert tree(b_pools.joinpath(MAPPED[pool], *parts)) == tree(a_pools.joinpath(pool, *parts))
    images: list[tuple[str, ...]] = [
        ("custom", "default_blk"),
        ("custom-snapshots", "default_blk", "bs1"),
    ]
    for image in images:
        a_image = a_pools.joinpath(BTRFS_POOL, *image, "root.img").read_bytes()
        b_image = b_pools.joinpath(NEW_BTRFS, *image, "root.img").read_bytes()
        assert hashlib.sha256(b_image).digest() == hashlib.sha256(a_image).digest()
    # Started in boot.autostart.priority order, highest first; only what ran at backup time.
    started = [
        line.split()[1].rstrip(":")
        for line in rebuilt.first.stdout.splitlines()
        if line.endswith(": started")
    ]
    assert started == [
        "default/f1",
        "default/d1",
        "rc-own1/o1",
        "rc-own2/o2",
        f"{SECOND_PROJECT}/p1",
    ]
    assert b.exec("o2", "cat", "/mnt/ovol/f", project="rc-own2").stdout == "own\n"
    for project, name in [("default", "d1"), *OWN.items()]:
        inodes = b.exec(
            name, "stat", "-c", "%i", *(f"/root/hl/{n}" for n in "abc"), project=_project(project)
        ).stdout.split()
        assert len(inodes) == 3 and len(set(inodes)) == 1, (name, inodes)


def test_second_run_creates_nothing_and_says_what_exists(rebuilt: Rebuilt) -> None:
    done = rebuilt.second
    assert done.returncode == 0, done.stderr
    assert "0 to create" in done.stdout
    assert "restore all: 0 created" in done.stdout
    assert "exists  instance default/d1: left alone" in done.stdout
    assert rebuilt.after_second == rebuilt.after_first


def test_collision_is_reported_and_left_untouched(rebuilt: Rebuilt) -> None:
    assert "exists  instance default/clash: left alone" in rebuilt.dry_run.stdout
    assert clash(rebuilt.b) == rebuilt.clash_before
    assert (
        rebuilt.after_first["instances"]["default/clash"]
        == rebuilt.before["instances"]["default/clash"]
    )
    assert not list(
        (
            rebuilt.b.daemon.incus_dir
            / "storage-pools"
            / NEW_DIR
            / "containers"
            / "clash"
            / "rootfs"
        ).iterdir()
    )


def test_failure_part_way_names_what_was_created_and_a_fixed_map_completes(
    world: World, private_incus_factory: Factory, tmp_path: Path
) -> None:
    b = new_b(private_incus_factory)
    config = b_config(world, b, "b2")
    # --project: that project's entities and what they need, nothing else.
    only = run_cli(
        "restore",
        "all",
        "latest",
        *POOL_MAP,
        "--project",
        SECOND_PROJECT,
        "--dry-run",
        config=config,
    )
    assert only.returncode == 0, only.stderr
    steps = [line.split(None, 1) for line in only.stdout.splitlines() if line.startswith("  ")]
    assert [(action, what.split(":")[0].split(" onto")[0]) for action, what in steps] == [
        ("update", "project default"),
        ("create", f"project {SECOND_PROJECT}"),
        ("exists", f"storage pool {DEFAULT_POOL} as {NEW_DIR}"),
        ("create", f"network default/{world.server.bridge}"),
        ("update", "profile default/default"),
        ("create", f"instance {SECOND_PROJECT}/p1"),
    ]
    broken = (
        "--pool-map",
        f"{DEFAULT_POOL}={NEW_DIR}",
        "--pool-map",
        f"{BTRFS_POOL}={NEW_BTRFS}:btrfs:source={tmp_path}",  # exists, but is no btrfs
    )
    error = one_line_error(run_cli("restore", "all", "latest", *broken, config=config))
    assert f"restore all stopped at storage pool {NEW_BTRFS}" in error, error
    created = f"project rc-own1, project rc-own2, project {SECOND_PROJECT}"
    assert f"created before it: {created}; updated from the archive: project default;" in error
    assert "run the same command again to continue" in error
    after = entities(b.daemon)
    assert SECOND_PROJECT in after["projects"]
    assert not after["instances"] and not after["networks"]

    done = run_cli("restore", "all", "latest", *POOL_MAP, config=config)
    assert done.returncode == 0, done.stderr
    assert f"exists  project {SECOND_PROJECT}: left alone" in done.stdout
    rebuilt = entities(b.daemon)
    assert rebuilt["instances"] == world.entities["instances"]
    assert rebuilt["volumes"] == world.entities["volumes"]


# --- check --drill -------------------------------------------------------------------------------


def host_links(bridge: str) -> dict[str, tuple[Any, ...]]:
    """`ip link` of the host's loopback and physical interfaces, A's bridge and what is
    attached to it (other daemons on this machine may add and remove interfaces meanwhile)."""
    links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, check=True).stdout)
    return {
        link["ifname"]: (link["ifindex"], link.get("address"), link.get("master"), link["flags"])
        for link in links
        if link["ifname"] in ("lo", bridge)
        or link.get("master") == bridge
        or Path("/sys/class/net", link["ifname"], "device").exists()
    }


def drilled(done: subprocess.CompletedProcess[str] | str) -> tuple[Path, int]:
    """The scratch directory and network namespace a drill reported."""
    stdout = done if isinstance(done, str) else done.stdout
    found = re.search(r"scratch Incus started in (\S+) \(network namespace (\d+)\)", stdout)
    assert found, stdout
    return Path(found[1]), int(found[2])


def assert_nothing_left(scratch: Path, netns: int) -> None:
    """No scratch daemon, process, mount, network namespace, loop device or directory."""
    assert not scratch.exists()
    assert not mounts.mounts_below(scratch.parent)
    in_namespace = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.stat(entry / "ns" / "net").st_ino == netns:
                in_namespace.append(entry.name)
        except OSError:
            continue
    assert not in_namespace
    backing = [p.read_text() for p in Path("/sys/block").glob("loop*/loop/backing_file")]
    assert not [b for b in backing if b.startswith(str(scratch))]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(scratch) not in ps


def test_drill_restores_starts_and_compares_without_touching_the_host(world: World) -> None:
    links = host_links(world.server.bridge)
    before = entities(world.daemon)
    states = world.daemon.query("/1.0/instances?recursion=1&all-projects=true")
    done = run_cli("check", "--drill", "--scratch", str(world.scratch), config=world.config)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(re.match(r"drill: needs about \d+ MiB in ", line) for line in lines), done.stdout
    for ref in ("default/d1", "default/f1", f"{SECOND_PROJECT}/p1", "rc-own1/o1", "rc-own2/o2"):
        wanted = (
            rf"drill: instance {ref}: restored in [\d.]+ s, \d+ files match, started in [\d.]+ s$"
        )
        assert any(re.match(wanted, line) for line in lines), (ref, done.stdout)
    clash = r"drill: instance default/clash: restored in [\d.]+ s, \d+ files match, not started"
    assert any(re.match(clash, line) for line in lines), done.stdout
    for ref in (f"{DEFAULT_POOL}/default/vol", f"{BTRFS_POOL}/default/blk"):
        wanted = rf"drill: volume {ref}: restored in [\d.]+ s, [1-9]\d* files match$"
        assert any(re.match(wanted, line) for line in lines), (ref, done.stdout)
    assert re.search(r"drill: passed: local::\S+: 6 instance\(s\) restored", done.stdout)
    assert " DIFFER" not in done.stdout
    assert_nothing_left(*drilled(done))
    assert host_links(world.server.bridge) == links
    assert entities(world.daemon) == before
    assert world.daemon.query("/1.0/instances?recursion=1&all-projects=true") == states


def test_drill_reports_exactly_a_hard_link_restored_otherwise(world: World) -> None:
    """The drill stopped between the restore and the comparison: one name of o1's hard-linked
    file is replaced by another file; the drill names exactly that file."""
    argv = command(world.config, "check", "--drill", "--scratch", str(world.scratch))
    argv += ["--instance", "rc-own1/o1"]
    with paused(argv, "drill-restored", stdout=subprocess.PIPE) as proc:
        (link,) = world.scratch.glob(
            "*/incus/storage-pools/*/containers/rc-own1_o1/rootfs/root/hl/a"
        )
        link.unlink()
        link.write_text("linked\n")  # the same content, but no longer the same file
        resume(proc)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "drill: instance rc-own1/o1: restored in" in out and "1 of " in out, out
    assert "instance rc-own1/o1: 1 file(s) differ: container/rootfs/root/hl/a" in err, err
    assert_nothing_left(*drilled(out))


def test_restore_test_compares_hard_links_by_their_file(world: World) -> None:
    done = run_cli("check", "--restore-test", config=world.config)
    assert done.returncode == 0, done.stderr
    for ref in ("default/d1", "rc-own1/o1", "rc-own2/o2"):
        assert f"restore test: instance {ref}: every file identical" in done.stdout, done.stdout


def test_dry_run_names_what_collides_with_the_host(
    world: World, private_incus_factory: Factory
) -> None:
    """A server in the host's network namespace, where A's bridge exists already, and a pool
    map onto a source that does not exist: both are collisions, before anything changes."""
    daemon = private_incus_factory()
    daemon.start()
    daemon.incus("storage", "create", NEW_DIR, "dir")
    b = IncusServer(daemon=daemon, bridge="")
    config = b_config(world, b, "host-netns")
    before = entities(daemon)
    missing = f"/tmp/incus-borg-test-missing-{os.getpid()}"
    maps = ("--pool-map", f"{DEFAULT_POOL}={NEW_DIR}",
            "--pool-map", f"{BTRFS_POOL}={NEW_BTRFS}:dir:source={missing}")  # fmt: skip
    for args in (["--dry-run"], []):
        done = run_cli("restore", "all", "latest", *maps, *args, config=config)
        error = one_line_error(done)
        bridge = world.server.bridge
        assert (
            f"collide network default/{bridge}: this server's host has a network interface named {bridge}"
            in done.stdout
        )
        assert (
            f"collide storage pool {BTRFS_POOL} as {NEW_BTRFS}: its source {missing} does not exist"
            in done.stdout
        )
        assert "2 collision(s) with this server" in error, error
        assert entities(daemon) == before


def test_drill_of_a_damaged_run_names_the_instance_and_leaves_nothing(
    world: World, tmp_path: Path
) -> None:
    damaged = tmp_path / "damaged"
    shutil.copytree(world.root / "repo", damaged)
    damage_segment(damaged, BIG[1000:1064])  # f1's data only
    data = yaml.safe_load(world.config.read_text())
    data["repositories"] = [{"path": str(damaged), "label": "damaged", "encryption": "none"}]
    config = write_config(tmp_path / "damaged.yaml", data)
    done = run_cli(
        "check",
        "--drill",
        "--scratch",
        str(world.scratch),
        "--instances",
        "default/f1",
        "--instances",
        "d1",
        config=config,
        env={"BORG_BASE_DIR": str(tmp_path / "borg")},  # the copy is a repository of its own
    )
    error = one_line_error(done)
    assert "drill of damaged::" in error and "instance default/f1: not restored" in error, error
    assert "instance default/d1" not in error, error
    assert "drill: instance default/f1: NOT restored" in done.stdout
    assert re.search(r"drill: instance default/d1: restored .* files match, started", done.stdout)
    assert "drill: FAILED" in done.stdout
    assert_nothing_left(*drilled(done))


def test_drill_without_the_space_is_refused_up_front_with_the_figure(world: World) -> None:
    small = Path(tempfile.mkdtemp(prefix="incus-borg-test-small-", dir="/tmp"))
    small.chmod(0o711)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(small)], check=True)
    try:
        small.chmod(0o711)
        done = run_cli("check", "--drill", "--scratch", str(small), config=world.config)
        error = one_line_error(done)
        found = re.search(rf"needs about (\d+) MiB in {small}, which has (\d+) MiB free", error)
        assert found, error
        assert int(found[1]) > 16 >= int(found[2])
        assert "scratch Incus started" not in done.stdout
        assert not list(small.iterdir())
    finally:
        mounts.unmount(small)
        small.rmdir()


def start_drill(world: World, *args: str) -> subprocess.Popen[str]:
    """`check --drill` in the background, its output unbuffered."""
    argv = [sys.executable, "-m", "incus_borg", "-c", str(world.config), "check", "--drill"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BORG_", "INCUS_BORG"))}
    return subprocess.Popen(
        [*argv, "--scratch", str(world.scratch), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )


def read_until(proc: subprocess.Popen[str], text: str) -> str:
    """What a background drill printed, up to the first line holding `text`."""
    assert proc.stdout is not None
    seen = ""
    while text not in seen.rpartition("\n")[0]:
        line = proc.stdout.readline()
        assert line, f"the drill ended before printing {text!r}: {seen}"
        seen += line
    return seen


def no_borg_on(repo: Path) -> bool:
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return str(repo) not in ps


def test_interrupted_or_killed_drill_leaves_nothing(world: World) -> None:
    # SIGTERM (as systemd stops a unit) while it restores: everything is torn down.
    proc = start_drill(world)
    seen = read_until(proc, "restored as")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "interrupted" in stderr, stderr
    assert_nothing_left(*drilled(seen))

    # SIGKILL: the daemon outlives incus-borg; the next drill removes it first.
    proc = start_drill(world)
    seen = read_until(proc, "scratch Incus started")
    proc.kill()
    proc.communicate(timeout=60)
    scratch, netns = drilled(seen)
    assert scratch.exists()
    assert wait_for(lambda: no_borg_on(world.root / "repo"), 60)
    done = run_cli(
        "check",
        "--drill",
        "--scratch",
        str(world.scratch),
        "--instance",
        f"{SECOND_PROJECT}/p1",
        config=world.config,
    )
    assert done.returncode == 0, done.stderr
    assert f"drill: removing what a killed drill left in {scratch}" in done.stdout
    assert_nothing_left(scratch, netns)
    assert_nothing_left(*drilled(done))
    assert re.search(rf"drill: instance {SECOND_PROJECT}/p1: restored .*, started in", done.stdout)
    assert "instance default/d1" not in done.stdout  # only p1, and what it needs
