"""Many instances: one archive per run and repository, every instance quiesced only while it
is read, runs of the previous layout still restore, and a kill -9 in any phase of a backup is
undone by the next one."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli import borg, incus_config, run_cli
from harness.incusd import IncusError, cmdline, wait_for
from harness.server import BTRFS_POOL, DEFAULT_POOL, IncusServer
from phases import command, kill_9, paused

from incus_borg.host import mounts

pytestmark = pytest.mark.incus

PER_POOL = 6
NAMES = [f"sc-d{i}" for i in range(PER_POOL)] + [f"sc-b{i}" for i in range(PER_POOL)]
SHARED = {f"/usr/share/doc/f{i}": (b"shared %d\n" % i * 200, 0, 0, 0o644) for i in range(20)}


@dataclass
class Env:
    """Twelve running containers (six per pool), their checksums, and a config with two
    repositories."""

    server: IncusServer
    root: Path
    config: Path
    sums: dict[str, dict[str, str]]

    def archives(self, repo: str) -> list[dict[str, Any]]:
        listed = borg("list", "--json", str(self.root / repo)).stdout
        return list(json.loads(listed)["archives"])

    def states(self, names: list[str] = NAMES) -> dict[str, str]:
        return {name: self.server.state(name) for name in names}

    def assert_released(self) -> None:
        """Every instance runs, no temporary snapshot, nothing mounted, no journal, no borg."""
        assert set(self.states().values()) == {"Running"}, self.states()
        for name in NAMES:
            snaps = self.server.daemon.query(f"/1.0/instances/{name}/snapshots")
            assert not [s for s in snaps if "incus-borg-" in s], snaps
        assert not mounts.mounts_below(self.root / "staging")
        assert not (self.root / "staging.journal").exists()
        assert not borgs_of(self.root), "a borg of the run is still there"


def borgs_of(root: Path) -> list[int]:
    """Processes whose command line names a repository below `root`."""
    return [
        int(p.name)
        for p in Path("/proc").glob("[0-9]*")
        if str(root / "repo") in " ".join(cmdline(int(p.name)))
    ]


@pytest.fixture(scope="module")
def env(incus_server: IncusServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("scale")
    for name in NAMES:
        pool = DEFAULT_POOL if name.startswith("sc-d") else BTRFS_POOL
        files = {**SHARED, "/root/own.bin": (os.urandom(100_000), 1000, 1000, 0o600)}
        incus_server.launch(name, pool=pool, files=files)
    repositories = [
        {"path": str(root / "repo-a"), "label": "a"},
        {"path": str(root / "repo-b"), "label": "b"},
    ]
    config = incus_config(incus_server, root, repositories=repositories, instances=NAMES)
    assert run_cli("init", config=config).returncode == 0
    sums = {name: incus_server.checksums(name) for name in NAMES}
    yield Env(incus_server, root, config, sums)
    for name in NAMES:
        incus_server.delete(name)


def backup(env: Env, *args: str, config: Path | None = None) -> dict[str, Any]:
    done = run_cli("backup", "--json", *args, config=config or env.config)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def test_one_archive_per_repository_holds_every_instance(env: Env, tmp_path: Path) -> None:
    summary = backup(env)
    run = summary["run"]
    for repo in ("repo-a", "repo-b"):
        made = [a["name"] for a in env.archives(repo) if a["name"].startswith(run)]
        assert made == [run], made
    borg("extract", "--numeric-ids", f"{env.root / 'repo-b'}::{run}", cwd=tmp_path)
    for name in NAMES:
        rootfs = tmp_path / "instances/default" / name / "backup/container/rootfs"
        for path, digest in env.sums[name].items():
            on_disk = (rootfs / path.lstrip("/")).read_bytes()
            assert __import__("hashlib").sha256(on_disk).hexdigest() == digest, (name, path)
    modes = {i["ref"]: i["mode"] for i in summary["items"]}
    assert modes["default/sc-d0"] == "freeze" and modes["default/sc-b0"] == "snapshot"
    assert all(i["window"] < 1 for i in summary["items"] if i["mode"] == "snapshot")
    env.assert_released()

    again = backup(env)
    for label in ("a", "b"):
        assert again["deduplicated_bytes_added"][label] < 0.01 * again["bytes_read"][label]


def test_freeze_follows_the_read(env: Env, tmp_path: Path) -> None:
    """While B is read, A (read before it) runs again and C (read after it) is not frozen."""
    a, b, c = "sc-d0", "sc-d1", "sc-d2"
    env.server.push_file(b, "/root/big.bin", os.urandom(120_000_000))
    config = incus_config(env.server, tmp_path, instances=[a, b, c], mode="freeze")
    assert run_cli("init", config=config).returncode == 0
    samples: list[dict[str, str]] = []
    done = threading.Event()

    def sample() -> None:
        """A and C are sampled between two samples of B: when B was frozen at both, A and
        C were seen while B was frozen (each sample takes a moment)."""
        while not done.is_set():
            try:
                first = env.server.state(b)
                seen = {a: env.server.state(a), c: env.server.state(c)}
                if first == env.server.state(b):
                    samples.append({b: first, **seen})
            except IncusError:  # the daemon is down while its database is copied
                continue

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        backup(env, config=config)
    finally:
        done.set()
        sampler.join()
        env.server.exec(b, "rm", "/root/big.bin")
    while_b = [s for s in samples if s[b] == "Frozen"]
    assert while_b, "B was never seen frozen"
    assert all(s[a] != "Frozen" and s[c] != "Frozen" for s in while_b), while_b


def test_run_of_the_previous_layout_restores(env: Env, tmp_path: Path) -> None:
    """A run of format 1: one archive per instance, the run's own archive with the rest."""
    pre = run_cli("hook", "pre", "--instance", "sc-d3", config=env.config)
    assert pre.returncode == 0, pre.stderr
    staging, repo = env.root / "staging", env.root / "repo-a"
    try:
        manifest = json.loads((staging / "manifest.json").read_text())
        run = "old-layout-run"
        manifest |= {"format": 1, "run": run, "hook_mode": False}
        for item in manifest["instances"]:
            item["archive"] = f"{run}@instance@default@{item['name']}"
            borg("create", "--numeric-ids", f"{repo}::{item['archive']}", item["path"], cwd=staging)
        old = tmp_path / "old"
        for part in ("definitions", "host", "dumps"):
            (old / part).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["cp", "-a", str(staging / part), str(old / part)], check=True)
        (old / "manifest.json").write_text(json.dumps(manifest))
        borg("create", f"{repo}::{run}", "manifest.json", "definitions", "host", "dumps", cwd=old)
    finally:
        assert run_cli("hook", "post", config=env.config).returncode == 0
    done = run_cli(
        "restore", "instance", run, "sc-d3", "--as", "sc-old", "--repository", "a",
        config=env.config,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    try:
        env.server.start("sc-old")
        assert env.server.checksums("sc-old") == env.sums["sc-d3"]
    finally:
        env.server.delete("sc-old")


def _snapshot_taken(env: Env) -> bool:
    snaps = env.server.daemon.query("/1.0/instances/sc-b0/snapshots")
    return any("incus-borg-" in s for s in snaps)


# Each phase: its pause point, and what holds while incus-borg is stopped there.
PHASES: dict[str, tuple[str, Callable[[Env], bool]]] = {
    "daemon stopped": ("daemon-stopped", lambda env: not env.server.daemon.running()),
    "snapshot held": ("held:default/sc-b0", _snapshot_taken),
    "freeze held": ("held:default/sc-d0", lambda env: env.states(["sc-d0"])["sc-d0"] == "Frozen"),
    "borg running": ("borg-started", lambda env: bool(borgs_of(env.root))),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_kill_9_in_each_phase_then_backup_again(env: Env, phase: str) -> None:
    point, holds = PHASES[phase]
    with paused(command(env.config, "backup"), point) as proc:
        assert holds(env), phase
        kill_9(proc)
    assert wait_for(lambda: not borgs_of(env.root), 30), "the run's borg outlived it"
    done = run_cli("backup", config=env.config)
    assert done.returncode in (0, 1), done.stderr
    assert env.server.daemon.running()
    env.assert_released()
    latest = yaml.safe_load(run_cli("list", "latest", "--json", config=env.config).stdout)
    assert {i["name"] for i in latest["instances"]} == set(NAMES)


def test_quiesce_per_repository_reads_one_repository_after_the_other(
    env: Env, tmp_path: Path
) -> None:
    """Each repository gets its own pass (and its own manifest, with its own windows)."""
    repositories = [
        {"path": str(tmp_path / "repo-a"), "label": "a"},
        {"path": str(tmp_path / "repo-b"), "label": "b"},
    ]
    config = incus_config(
        env.server, tmp_path, repositories=repositories, instances=NAMES[:2],
        quiesce_per_repository=True,
    )  # fmt: skip
    assert run_cli("init", config=config).returncode == 0
    summary = backup(env, config=config)
    for repo in ("repo-a", "repo-b"):
        listed = json.loads(borg("list", "--json", str(tmp_path / repo)).stdout)["archives"]
        assert [a["name"] for a in listed] == [summary["run"]]
        borg("extract", f"{tmp_path / repo}::{summary['run']}", "manifest.json", cwd=tmp_path)
        windows = [
            i["window"] for i in json.loads((tmp_path / "manifest.json").read_text())["instances"]
        ]
        assert all(w is not None and w < 5 for w in windows), windows
    env.assert_released()
