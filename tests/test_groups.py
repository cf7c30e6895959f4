"""Consistency groups: a group's instances are captured at one moment (a freeze group held
together for its read, a snapshot group frozen, snapshotted and thawed together), the run
records each group, `restore group` brings every member back or none, and a kill during a
group's window leaves nothing frozen and no snapshot after the next run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli import (
    BIN,
    ROOT,
    borg,
    borg_env,
    borgmatic_config,
    incus_config,
    one_line_error,
    run_cli,
    tool_env,
    write_config,
)
from harness.incusd import wait_for
from harness.server import BTRFS_POOL, DEFAULT_POOL, SECOND_PROJECT, IncusServer
from phases import command, kill_9, paused

from incus_borg.host import freezer, mounts

pytestmark = pytest.mark.incus

DIRS = ["gc-d1", "gc-d2"]
BTRFS = ["gc-b1", "gc-b2"]
CLOCKS = DIRS + BTRFS
TEN = [f"gt-{i}" for i in range(10)]
VG = "gv-1"  # a dir container in group `vg`, with a custom volume only it uses
ALL = CLOCKS + TEN + [VG]
PROFILE = "ibg-clock"
GROUP = "default/clock"
SIZE = 16_000_000  # bytes of data in each dir member: its read takes a while
# Appends the host-wide uptime (this host runs no lxcfs: /proc/uptime is the host's) every
# 10 ms.
CLOCK = (
    "while :; do read u i < /proc/uptime; echo $u >> /root/clock; usleep 10000; done "
    "</dev/null >/dev/null 2>&1 &"
)
EXAMPLE = ROOT / "examples/borgmatic/config.yaml"


@dataclass
class Env:
    """Four clock containers (two dir, two btrfs) in group `clock` (mode freeze, from their
    profile), ten btrfs containers in group `ten` (snapshot), and a config for them."""

    server: IncusServer
    root: Path
    config: Path

    def cli(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, config=config or self.config)

    def incus(self, *args: str) -> str:
        return self.server.daemon.incus(*args).stdout

    def manifest(self, archive: str | None = None) -> dict[str, Any]:
        name = archive or newest(self.root / "repo")
        done = borg("extract", "--stdout", f"{self.root / 'repo'}::{name}", "manifest.json")
        return dict(json.loads(done.stdout))

    def assert_released(self, names: list[str]) -> None:
        for name in names:
            assert self.server.state(name) == "Running", name
            assert not frozen(self.server, name), name
            snaps = self.server.daemon.query(f"/1.0/instances/{name}/snapshots")
            assert not [s for s in snaps if "incus-borg-" in s], (name, snaps)
        assert not mounts.mounts_below(self.root / "staging")


def frozen(server: IncusServer, name: str) -> bool:
    """Whether the kernel holds the container frozen (Incus does not see a snapshot group's
    freeze, made through the kernel's freezer)."""
    pid = int(server.daemon.query(f"/1.0/instances/{name}/state")["pid"])
    state = freezer.state_file(pid)
    if state is None:
        return server.state(name) == "Frozen"
    return state.read_text().strip() == "FROZEN"


def newest(repo: Path) -> str:
    listed = json.loads(borg("list", "--json", str(repo)).stdout)["archives"]
    return str(listed[-1]["name"])


def start_clock(server: IncusServer, name: str, project: str | None = None) -> None:
    server.exec(name, "setsid", "sh", "-c", CLOCK, project=project)


@pytest.fixture(scope="module")
def env(incus_server: IncusServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("groups")
    daemon = incus_server.daemon
    daemon.incus("profile", "create", PROFILE)
    keys = ["user.incus-borg.group=clock", "user.incus-borg.mode=freeze"]
    daemon.incus("profile", "set", PROFILE, *keys)
    for name in CLOCKS:
        pool = DEFAULT_POOL if name in DIRS else BTRFS_POOL
        files = {"/root/data.bin": (os.urandom(SIZE if name in DIRS else 1000), 0, 0, 0o600)}
        incus_server.launch(name, pool=pool, files=files, start=False)
        daemon.incus("profile", "add", name, PROFILE)
        incus_server.start(name)
        start_clock(incus_server, name)
    for name in TEN:
        incus_server.launch(name, pool=BTRFS_POOL, start=False)
        daemon.incus("config", "set", name, "user.incus-borg.group=ten")
        incus_server.start(name)
        start_clock(incus_server, name)
    incus_server.launch(VG, start=False)
    daemon.incus("config", "set", VG, "user.incus-borg.group=vg")
    for pool, volume, user in ((DEFAULT_POOL, "gvd", VG), (BTRFS_POOL, "gvb", TEN[1])):
        daemon.incus("storage", "volume", "create", pool, volume)
        daemon.incus("storage", "volume", "attach", pool, volume, user, "/mnt/v")
    incus_server.start(VG)
    config = incus_config(incus_server, root, instances=ALL)
    assert run_cli("init", config=config).returncode == 0
    yield Env(incus_server, root, config)
    for name in ALL:
        incus_server.delete(name)
    daemon.incus("storage", "volume", "delete", DEFAULT_POOL, "gvd")
    daemon.incus("storage", "volume", "delete", BTRFS_POOL, "gvb")
    daemon.incus("profile", "delete", PROFILE)


def last_records(read: dict[str, str]) -> dict[str, float]:
    """Each clock file's last complete record."""
    return {name: float(text.split()[-1]) for name, text in read.items()}


def gap(records: dict[str, float]) -> float:
    return max(records.values()) - min(records.values())


def archived_clocks(repo: Path, archive: str, names: list[str] = CLOCKS) -> dict[str, str]:
    path = "instances/default/{}/backup/container/rootfs/root/clock"
    return {
        name: borg("extract", "--stdout", f"{repo}::{archive}", path.format(name)).stdout
        for name in names
    }


def test_a_group_is_captured_at_one_moment_and_restored_together(env: Env) -> None:
    """With the group, the four clocks restored by `restore group` stop < 0.2 s apart; without
    it (the same instances read one after another), the gap is recorded too."""
    done = env.cli("backup")
    assert done.returncode == 0, done.stdout
    said = re.search(
        rf"group {GROUP}: ([^:]+): frozen together at (\S+) for ([\d.]+) s \(the whole group's "
        r"read\)",
        done.stdout,
    )
    assert said, done.stdout
    members = said.group(1).split(", ")
    assert sorted(members) == sorted(f"default/{n}" for n in CLOCKS)
    env.assert_released(ALL)
    manifest = env.manifest()
    (clock,) = [g for g in manifest["groups"] if g["name"] == GROUP]
    assert clock["mode"] == "freeze" and clock["window"] == pytest.approx(
        float(said.group(3)), abs=0.01
    )
    assert {
        i["name"]: i["group"] for i in manifest["instances"] if i["name"] in CLOCKS
    } == dict.fromkeys(CLOCKS, GROUP)

    restored = env.cli("restore", "group", "clock", "latest", "--project", SECOND_PROJECT)
    assert restored.returncode == 0, restored.stderr
    assert f"group {GROUP}: 4 instance(s) restored together" in restored.stdout, restored.stdout
    try:
        read = {
            name: env.incus("file", "pull", "--project", SECOND_PROJECT, f"{name}/root/clock", "-")
            for name in CLOCKS
        }
    finally:
        for name in CLOCKS:
            env.server.delete(name, project=SECOND_PROJECT)
    grouped = gap(last_records(read))

    env.incus("profile", "unset", PROFILE, "user.incus-borg.group")
    try:
        alone = env.cli("backup")
    finally:
        env.incus("profile", "set", PROFILE, "user.incus-borg.group=clock")
    assert alone.returncode == 0, alone.stdout
    assert f"group {GROUP}" not in alone.stdout
    ungrouped = gap(last_records(archived_clocks(env.root / "repo", newest(env.root / "repo"))))
    print(f"\nclock gap: {grouped:.3f} s with the group, {ungrouped:.3f} s without")
    assert grouped < 0.2, (grouped, read)


def test_a_group_holds_its_volumes_and_a_named_member_brings_its_group(env: Env) -> None:
    done = env.cli("backup")
    assert done.returncode == 0, done.stdout + done.stderr
    manifest = env.manifest()
    held = {g["name"]: g["volumes"] for g in manifest["groups"]}
    assert held["default/vg"] == [f"{DEFAULT_POOL}/default/gvd"], held
    assert held["default/ten"] == [f"{BTRFS_POOL}/default/gvb"], held
    assert held[GROUP] == []
    volumes = {v["name"]: v for v in manifest["volumes"]}
    assert volumes["gvd"]["group"] == "default/vg" and volumes["gvd"]["mode"] == "freeze"
    assert volumes["gvb"]["group"] == "default/ten" and volumes["gvb"]["mode"] == "snapshot"
    snaps = env.server.daemon.query(f"/1.0/storage-pools/{BTRFS_POOL}/volumes/custom/gvb/snapshots")
    assert not [s for s in snaps if "incus-borg-" in s], snaps
    env.assert_released(ALL)

    planned = env.cli("backup", "--dry-run", "--instance", "gc-d1")
    assert planned.returncode == 0, planned.stderr
    for name in CLOCKS[1:]:
        wanted = f"instance default/{name}: read too, as a member of default/gc-d1's group"
        assert wanted in planned.stdout, planned.stdout
    assert f"group {GROUP} (from the profile {PROFILE}): " in planned.stdout


def test_ten_btrfs_members_are_frozen_for_their_snapshots_under_half_a_second(env: Env) -> None:
    config = incus_config(env.server, env.root / "ten", instances=TEN)
    assert env.cli("init", config=config).returncode == 0
    done = env.cli("backup", config=config)
    assert done.returncode == 0, done.stdout
    said = re.search(
        r"group default/ten: [^:]+: frozen for their snapshots together at \S+ for ([\d.]+) s",
        done.stdout,
    )
    assert said, done.stdout
    repo = env.root / "ten" / "repo"
    listed = borg("extract", "--stdout", f"{repo}::{newest(repo)}", "manifest.json").stdout
    (ten,) = json.loads(listed)["groups"]
    assert ten["mode"] == "snapshot" and len(ten["members"]) == 10
    clocks = gap(last_records(archived_clocks(repo, newest(repo), TEN)))
    print(
        f"\nten btrfs members frozen for their snapshots: {ten['window']:.3f} s, clocks {clocks:.3f} s apart"
    )
    assert ten["window"] < 0.5, ten
    assert clocks < 0.1, clocks  # every snapshot holds the moment of the freeze
    env.assert_released(TEN)


def test_bad_groups_are_refused_with_one_line(env: Env, tmp_path: Path) -> None:
    mixed = incus_config(
        env.server, tmp_path / "mixed", instances=["gc-d1", "gt-0"],
        groups=[{"name": "mix", "instances": ["gc-d1", "gt-0"]}],
    )  # fmt: skip
    error = one_line_error(env.cli("backup", config=mixed))
    assert "group mix mixes modes" in error and "default/gc-d1 freeze" in error, error
    assert "default/gt-0 snapshot" in error, error

    twice = incus_config(
        env.server, tmp_path / "twice",
        groups=[{"name": "a", "instances": ["gc-d1"]}, {"name": "b", "instances": ["default/gc-d1"]}],
    )  # fmt: skip
    error = one_line_error(env.cli("backup", "--dry-run", config=twice))
    assert "default/gc-d1 is in groups a and b" in error, error

    env.incus("config", "set", "gc-b1", "user.incus-borg.mode=skip")
    try:
        error = one_line_error(env.cli("backup", "--dry-run"))
    finally:
        env.incus("config", "unset", "gc-b1", "user.incus-borg.mode")
    assert f"group {GROUP}: instance default/gc-b1 has mode skip" in error, error

    env.incus("config", "set", "gc-b1", "user.incus-borg.group=no way")
    try:
        error = one_line_error(env.cli("backup", "--dry-run"))
    finally:
        env.incus("config", "unset", "gc-b1", "user.incus-borg.group")
    assert "user.incus-borg.group='no way'" in error and "not a group name" in error, error

    error = one_line_error(env.cli("restore", "group", "nosuch"))
    assert "no group 'nosuch'" in error, error

    # A group whose only member was left out of the run (its pre command failed).
    lonely = incus_config(
        env.server, tmp_path / "lonely", instances=["gt-0"],
        groups=[{"name": "lonely", "instances": ["gt-0"]}],
    )  # fmt: skip
    assert env.cli("init", config=lonely).returncode == 0
    env.incus("config", "set", "gt-0", "user.incus-borg.pre=false")
    try:
        partial = env.cli("backup", config=lonely)
    finally:
        env.incus("config", "unset", "gt-0", "user.incus-borg.pre")
    assert partial.returncode == 1, partial.stderr
    archive = newest(tmp_path / "lonely" / "repo")
    error = one_line_error(env.cli("restore", "group", "lonely", archive, config=lonely))
    assert "group lonely has no instance in" in error, error
    error = one_line_error(env.cli("restore", "group", "lonely", config=lonely))
    assert "group 'lonely'" in error, error

    # A group read without one of its members is not restored as if it were whole.
    pair = incus_config(
        env.server, tmp_path / "pair", instances=["gt-2"],
        groups=[{"name": "pair", "instances": ["gt-2", "gt-3"]}],
    )  # fmt: skip
    assert env.cli("init", config=pair).returncode == 0
    env.incus("config", "set", "gt-3", "user.incus-borg.pre=false")
    try:
        partial = env.cli("backup", config=pair)
    finally:
        env.incus("config", "unset", "gt-3", "user.incus-borg.pre")
    assert partial.returncode == 1, partial.stderr
    assert "(left out of the run: default/gt-3)" in partial.stdout, partial.stdout
    archive = newest(tmp_path / "pair" / "repo")
    error = one_line_error(env.cli("restore", "group", "pair", archive, config=pair))
    assert "group pair was read without default/gt-3" in error, error

    typo = incus_config(
        env.server, tmp_path / "typo", groups=[{"name": "t", "instances": ["gc-d1", "gc-dd"]}]
    )
    error = one_line_error(env.cli("backup", "--dry-run", config=typo))
    assert "group t (configuration) names instance default/gc-dd" in error, error


def test_restore_group_replaces_nothing_when_one_member_cannot_be_restored(
    env: Env, tmp_path: Path
) -> None:
    assert env.cli("backup").returncode in (0, 1)
    tree = tmp_path / "tree"
    tree.mkdir()
    repo = env.root / "repo"
    subprocess.run(
        [str(BIN / "borg"), "extract", f"{repo}::{newest(repo)}"], cwd=tree, env=borg_env(),
        check=True,
    )  # fmt: skip
    # The member read last has no index.yaml: the others are built (and verified) first.
    (tree / "instances/default/gc-d2/backup/index.yaml").unlink()
    before = {name: env.incus("file", "pull", f"{name}/root/clock", "-") for name in CLOCKS}
    for extra in ([], ["--replace"]):
        project = ["--project", SECOND_PROJECT] if not extra else []
        done = env.cli("restore", "group", "clock", str(tree), *project, *extra)
        error = one_line_error(done)
        assert "gc-d2" in error and "index.yaml" in error, error
        for where in ("default", SECOND_PROJECT):
            names = env.incus("list", "--project", where, "--format", "csv", "-c", "n").split()
            assert not [n for n in names if "-restoring-" in n or "-replaced-" in n], names
        second = env.incus("list", "--project", SECOND_PROJECT, "--format", "csv", "-c", "n")
        assert not set(second.split()) & set(CLOCKS), second
    env.assert_released(CLOCKS)
    for name in CLOCKS:  # the originals still run and keep their clocks going
        now = env.incus("file", "pull", f"{name}/root/clock", "-")
        assert now.startswith(before[name]) and len(now) > len(before[name]), name


def test_restore_group_replace_swaps_every_member_once_all_are_verified(env: Env) -> None:
    for name in CLOCKS:
        env.server.push_file(name, "/root/after-backup", b"made after the run\n")
    done = env.cli("restore", "group", "clock", "latest", "--replace", "--start")
    assert done.returncode == 0, done.stderr
    assert "members started together" in done.stdout, done.stdout
    for name in CLOCKS:
        assert env.server.state(name) == "Running", name
        missing = env.server.exec(name, "test", "-e", "/root/after-backup", check=False)
        assert missing.returncode == 1, name  # the archived state is back
        start_clock(env.server, name)
    names = env.incus("list", "--format", "csv", "-c", "n").split()
    assert not [n for n in names if "-replaced-" in n or "-restoring-" in n], names


def test_a_kill_in_a_group_s_window_is_undone_by_the_next_run(env: Env) -> None:
    for group, names in (("default/clock", CLOCKS), ("default/ten", TEN)):
        argv = command(env.config, "backup")
        with paused(argv, f"group-held:{group}") as proc:
            held = [n for n in names if frozen(env.server, n)]
            assert sorted(held) == sorted(names), (group, held)
            kill_9(proc)
        assert all(frozen(env.server, n) for n in names)
        again = env.cli("backup")
        assert again.returncode == 1, again.stderr  # it warns about what it undid
        assert "undoing them first" in again.stdout + again.stderr, again.stderr
        env.assert_released(ALL)


def test_status_list_and_report_show_each_group(env: Env, tmp_path: Path) -> None:
    assert env.cli("backup").returncode == 0
    status = env.cli("status")
    assert re.search(
        rf"group {GROUP}: [^:]+: frozen together at \S+ for [\d.]+ s", status.stdout
    ), status.stdout
    assert re.search(r"group default/ten: .*frozen for their snapshots together", status.stdout)
    listed = env.cli("list", "latest")
    assert re.search(rf"group {GROUP}: [^:]+: frozen together at", listed.stdout), listed.stdout
    page = tmp_path / "report.html"
    assert env.cli("report", "--html", str(page)).returncode == 0
    assert f"group {GROUP}: " in page.read_text()


def test_borgmatic_hook_mode_holds_the_group_together_just_in_time(env: Env) -> None:
    data = borgmatic_config(EXAMPLE, env.root, env.root / "repo-bm", env.config)
    path = write_config(env.root / "borgmatic.yaml", data)
    argv = [str(BIN / "borgmatic"), "-c", str(path)]
    tools = tool_env(env.config)
    created = subprocess.run([*argv, "repo-create", "--encryption", "repokey-blake2"], env=tools)
    assert created.returncode == 0
    done = subprocess.run(
        [*argv, "create", "--verbosity", "1"], env=tools, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert re.search(rf"group {GROUP}: [^:]+: frozen together at \S+ for [\d.]+ s", done.stderr)
    ten = r"group default/ten: [^:]+: frozen for their snapshots together at"
    assert re.search(ten, done.stderr), done.stderr
    record = [json.loads(line) for line in (env.root / "staging.keeper").read_text().splitlines()]
    held = [r["group"] for r in record if "group" in r]
    assert {g["name"] for g in held} == {GROUP, "default/ten", "default/vg"}, held
    env.assert_released(ALL)
    assert wait_for(lambda: not (env.root / "staging.journal").exists(), 10)


def test_the_drill_restores_and_boots_a_group_together(env: Env, tmp_path: Path) -> None:
    """Naming one member brings its whole group, and its members are started together (the
    drill reads a complete run: one of the whole server)."""
    whole = incus_config(env.server, tmp_path / "whole")
    assert env.cli("init", config=whole).returncode == 0
    assert env.cli("backup", config=whole).returncode == 0
    scratch = Path(tempfile.mkdtemp(prefix="incus-borg-test-drill-", dir="/tmp"))
    scratch.chmod(0o711)  # the scratch Incus's containers reach their files through it
    argv = ("check", "--drill", "--instance", "gc-d1", "--scratch", str(scratch))
    try:
        done = env.cli(*argv, config=whole)
    finally:
        scratch.rmdir()  # fails (loudly) if the drill left anything in it
    assert done.returncode == 0, done.stdout + done.stderr
    for name in CLOCKS:
        assert re.search(rf"drill: instance default/{name}: restored .* started in", done.stdout)
    assert f"group {GROUP}: 4 member(s) started together" in done.stdout, done.stdout
    assert "drill: passed" in done.stdout
