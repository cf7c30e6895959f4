"""incus-borg on a real Incus cluster (tests/harness/cluster.py, built once for the module).

Every member holds a container with files and a custom volume `data` (on m1 and m3 of the
same pool, project and name: volumes are named per member) attached to it; the members back
up into one shared repository, side by side. The tests then restore across members, refuse
what cannot work, prune per member and, last, replace a lost member.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli import borg, incus_config, one_line_error, run_cli
from harness.cluster import NETWORK, PROFILE, Cluster, Member
from harness.server import BTRFS_POOL, DEFAULT_POOL, SECOND_PROJECT

pytestmark = pytest.mark.incus

# member -> (container, its project, its pool); each has a volume `data` in DEFAULT_POOL.
CONTENT = {
    "m1": ("c1", "default", DEFAULT_POOL),
    "m2": ("c2", SECOND_PROJECT, BTRFS_POOL),
    "m3": ("c3", "default", BTRFS_POOL),
}
VOLUME = "data"
SPARE_POOL = "spare"  # btrfs, a size of its own on each member: `restore config` brings it back
SPARE_NETWORK = "clnet2"  # macvlan: `restore config` brings it back with each member's parent
CHECKED = ("/root", "/data")


@dataclass
class Env:
    """The cluster, one config per member, and what each member's run must hold."""

    cluster: Cluster
    root: Path
    configs: dict[str, Path] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)  # member -> its run
    sums: dict[str, dict[str, str]] = field(default_factory=dict)  # container -> checksums
    pids: dict[str, tuple[int, str]] = field(default_factory=dict)  # member -> daemon

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    def cli(self, member: str, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, config=self.configs[member])

    def query(self, path: str) -> Any:
        return self.cluster.first.daemon.query(path)


def daemon_identity(member: Member) -> tuple[int, str]:
    """The daemon's pid and start time (a restarted daemon differs in one of them)."""
    pid = member.daemon.pid
    assert pid is not None
    return pid, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def fill(cluster: Cluster) -> dict[str, dict[str, str]]:
    """A container and a volume `data` on each member, a pool and a network to lose; returns
    the containers' checksums."""
    first = cluster.first
    for i, member in enumerate(cluster.members):
        name, project, pool = CONTENT[member.name]
        on = f"--target {member.name}"
        for line in (
            f"storage volume create {DEFAULT_POOL} {VOLUME} {on} --project {project}",
            f"storage create {SPARE_POOL} btrfs size={300 + 10 * i}MiB {on}",
            f"network create {SPARE_NETWORK} --type macvlan parent={member.parent} {on}",
        ):
            first.incus(*line.split())
        files = {"/root/blob": os.urandom(150_000), "/root/who": member.name.encode()}
        cluster.launch(name, member.name, pool, project, ("default", PROFILE), files)
        device = f"pool={DEFAULT_POOL} source={VOLUME} path=/data --project {project}"
        first.incus("config", "device", "add", name, VOLUME, "disk", *device.split())
        script = f"head -c 90000 /dev/urandom >/data/blob; echo {member.name} >/data/who"
        first.server.exec(name, "sh", "-c", script, project=project)
    first.incus("storage", "create", SPARE_POOL, "btrfs")
    first.incus("network", "create", SPARE_NETWORK, "--type", "macvlan")
    return {
        name: first.server.checksums(name, CHECKED, project=project)
        for name, project, _ in CONTENT.values()
    }


def member_config(cluster: Cluster, root: Path, member: Member) -> Path:
    """A configuration for one member: its Incus directory and staging, the shared
    repository, and a retention of one run a day (for the prune test)."""
    return incus_config(
        member,
        root / member.name,
        # Borg waiting for a lock looks again every lock_wait / 10 s (at most 60 s).
        repositories=[{"path": str(root / "repo"), "label": "shared", "lock_wait": 60}],
        retention={"keep_daily": 1, "keep_weekly": 0, "keep_monthly": 0},
    )


@pytest.fixture(scope="module")
def env(incus_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    """The filled cluster, backed up by each member at once into one repository."""
    root = tmp_path_factory.mktemp("cluster")
    env = Env(incus_cluster, root)
    env.sums = fill(incus_cluster)
    for member in incus_cluster.members:
        env.configs[member.name] = member_config(incus_cluster, root, member)
    assert env.cli("m1", "init").returncode == 0
    env.pids = {m.name: daemon_identity(m) for m in incus_cluster.members}
    argv = [sys.executable, "-m", "incus_borg", "backup", "--json"]
    running = {
        name: subprocess.Popen(
            [*argv[:3], "-c", str(path), *argv[3:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, path in env.configs.items()
    }
    done = {name: proc.communicate(timeout=600) for name, proc in running.items()}
    for name, (out, err) in done.items():
        assert running[name].returncode == 0, err
        env.runs[name] = json.loads(out)["run"]
    yield env


def manifest(env: Env, run: str) -> dict[str, Any]:
    done = env.cli("m1", "list", run, "--json")
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def archived(env: Env, run: str, path: str) -> Any:
    """A YAML file of a run, parsed."""
    return yaml.safe_load(borg("extract", "--stdout", f"{env.repo}::{run}", path).stdout)


def archived_sums(env: Env, run: str, stage: str) -> dict[str, str]:
    """sha256 of the files below the /root and /data of an instance in a run, as borg
    recorded them, by their path inside the instance."""
    listing = borg("list", "--format", "{sha256} {type} {path}{NL}", f"{env.repo}::{run}", stage)
    sums = {}
    rootfs = f"{stage}/backup/container/rootfs"
    for line in listing.stdout.splitlines():
        digest, kind, path = line.split(" ", 2)
        if kind == "-" and path.startswith(f"{rootfs}/root/"):
            sums[path.removeprefix(rootfs)] = digest
    return sums


# --- backup ------------------------------------------------------------------------------------


def test_each_member_backs_up_its_own_without_stopping_the_daemon(env: Env) -> None:
    listing = json.loads(env.cli("m1", "list", "--json").stdout)["shared"]
    assert {e["name"]: e["member"] for e in listing} == {v: k for k, v in env.runs.items()}
    for member in env.cluster.members:
        name, project, pool = CONTENT[member.name]
        run = env.runs[member.name]
        assert run.startswith(f"{member.name}-"), run  # {member} in the default format
        data = manifest(env, run)
        assert data["member"] == member.name
        assert [(i["project"], i["name"], i["pool"]) for i in data["instances"]] == [
            (project, name, pool)
        ]
        assert [(v["pool"], v["project"], v["name"]) for v in data["volumes"]] == [
            (DEFAULT_POOL, project, VOLUME)
        ]
        assert data["database"] == "dumps-only" and "raft" in data["database_note"]
        assert daemon_identity(member) == env.pids[member.name], "the daemon was restarted"
        stage = f"instances/{project}/{name}"
        inside = {p: s for p, s in env.sums[name].items() if p.startswith("/root/")}
        assert archived_sums(env, run, stage) == inside
        paths = set(
            borg(
                "list", "--format", "{path}{NL}", f"{env.repo}::{run}", "dumps", "incus", "database"
            ).stdout.split()
        )
        assert {"dumps/global.sql", "dumps/local.sql"} <= paths
        assert {"incus/server.crt", "incus/cluster.crt", "incus/cluster.key"} <= paths
        assert not any(p.startswith("database") for p in paths)


def test_runs_hold_the_cluster_definitions(env: Env) -> None:
    run = env.runs["m2"]
    members = archived(env, run, "definitions/cluster-members.yaml")
    assert sorted(m["server_name"] for m in members) == ["m1", "m2", "m3"]
    assert archived(env, run, "definitions/cluster-groups.yaml")[0]["name"] == "default"
    networks = {n["name"]: n for n in archived(env, run, "definitions/networks.yaml")}
    parents = {m.name: {"parent": m.parent} for m in env.cluster.members}
    assert networks[NETWORK]["member_config"] == parents
    pools = {p["name"]: p for p in archived(env, run, "definitions/storage-pools.yaml")}
    sizes = {m: c["size"] for m, c in pools[SPARE_POOL]["member_config"].items()}
    assert sizes == {"m1": "300MiB", "m2": "310MiB", "m3": "320MiB"}
    instances = archived(env, run, "definitions/instances.yaml")
    assert sorted(i["name"] for i in instances) == ["c1", "c2", "c3"]


def test_dry_run_names_what_other_members_hold(env: Env) -> None:
    done = env.cli("m2", "backup", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert f"instance {SECOND_PROJECT}/c2 on {BTRFS_POOL}" in done.stdout
    for other in (
        "instance default/c1 (m1)",
        "instance default/c3 (m3)",
        f"volume {DEFAULT_POOL}/default/{VOLUME} (m1)",
        f"volume {DEFAULT_POOL}/default/{VOLUME} (m3)",
    ):
        assert f"{other}: on another cluster member, skipped" in done.stdout


def test_a_group_spanning_members_is_refused_with_one_line(env: Env) -> None:
    first = env.cluster.first
    for name in ("c1", "c3"):  # default/c1 on m1, default/c3 on m3
        first.incus("config", "set", name, "user.incus-borg.group=pair")
    try:
        error = one_line_error(env.cli("m1", "backup", "--dry-run"))
    finally:
        for name in ("c1", "c3"):
            first.incus("config", "unset", name, "user.incus-borg.group")
    assert "group default/pair spans cluster members" in error, error
    assert "default/c1" in error and "default/c3" in error, error


def test_latest_is_this_members_newest_run(env: Env) -> None:
    for member, run in env.runs.items():
        done = env.cli(member, "list", "latest")
        assert f"run {run} " in done.stdout and f"cluster member {member}" in done.stdout
    done = env.cli("m2", "list", "latest", "--member", "m3")
    assert f"run {env.runs['m3']} " in done.stdout


def test_hook_pre_on_a_member_stages_its_own(env: Env) -> None:
    staging = env.root / "m3" / "staging"
    done = env.cli("m3", "hook", "pre")
    try:
        assert done.returncode == 0, done.stderr
        staged = json.loads((staging / "manifest.json").read_text())
        assert staged["member"] == "m3" and staged["database"] == "dumps-only"
        assert [i["name"] for i in staged["instances"]] == ["c3"]
        assert (staging / "definitions" / "cluster-members.yaml").is_file()
        assert daemon_identity(env.cluster.member("m3")) == env.pids["m3"]
    finally:
        assert env.cli("m3", "hook", "post").returncode == 0


# --- restore across members --------------------------------------------------------------------


def test_instance_of_one_member_restored_onto_another(env: Env) -> None:
    # c1's volume `data` is on m1 only: --with-volumes restores it onto m2 as well.
    done = env.cli(
        "m1", "restore", "instance", env.runs["m1"], "c1", "--as", "c1-on-m2", "--target", "m2",
        "--with-volumes", "--start",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    copy = env.query("/1.0/instances/c1-on-m2")
    assert copy["location"] == "m2" and copy["status"] == "Running"
    assert env.query("/1.0/instances/c1")["location"] == "m1"  # the original, beside it
    assert env.cluster.first.server.checksums("c1-on-m2", CHECKED) == env.sums["c1"]
    env.cluster.first.server.delete("c1-on-m2")
    env.cluster.first.incus("storage", "volume", "delete", DEFAULT_POOL, VOLUME, "--target", "m2")


def test_volume_of_one_member_restored_onto_another(env: Env) -> None:
    run = env.runs["m1"]
    done = env.cli(
        "m3",
        "restore",
        "volume",
        run,
        f"{DEFAULT_POOL}/{VOLUME}",
        "--as",
        "data-m1",
        "--target",
        "m2",
    )
    assert done.returncode == 0, done.stderr
    volumes = env.query(f"/1.0/storage-pools/{DEFAULT_POOL}/volumes/custom?recursion=1")
    assert ("data-m1", "m2") in {(v["name"], v["location"]) for v in volumes}
    m2 = env.cluster.member("m2").daemon.incus_dir
    restored = m2 / "storage-pools" / DEFAULT_POOL / "custom" / "default_data-m1"
    assert (restored / "who").read_text() == "m1\n"
    env.cluster.first.incus(
        "storage", "volume", "delete", DEFAULT_POOL, "data-m1", "--target", "m2"
    )


def test_config_brings_back_pools_and_networks_with_each_members_config(env: Env) -> None:
    first = env.cluster.first
    first.incus("storage", "delete", SPARE_POOL)
    first.incus("network", "delete", SPARE_NETWORK)
    done = env.cli(
        "m2",
        "restore",
        "config",
        env.runs["m3"],
        "--pools",
        "--networks",
        SPARE_POOL,
        SPARE_NETWORK,
    )
    assert done.returncode == 0, done.stderr
    for i, member in enumerate(env.cluster.members):
        pool = env.query(f"/1.0/storage-pools/{SPARE_POOL}?target={member.name}")
        assert pool["status"] == "Created" and pool["config"]["size"] == f"{300 + 10 * i}MiB"
        network = env.query(f"/1.0/networks/{SPARE_NETWORK}?target={member.name}")
        assert network["status"] == "Created" and network["config"]["parent"] == member.parent


# --- refusals ----------------------------------------------------------------------------------


def test_restore_server_on_a_member_is_refused_and_changes_nothing(env: Env) -> None:
    member = env.cluster.member("m2")
    before = sorted(p.name for p in member.daemon.root.iterdir())
    error = one_line_error(env.cli("m2", "restore", "server", env.runs["m2"], "--yes"))
    assert "join a fresh member" in error and "restore all ARCHIVE --target NEW" in error
    assert daemon_identity(member) == env.pids["m2"]
    assert sorted(p.name for p in member.daemon.root.iterdir()) == before
    assert env.query("/1.0/instances/c2?project=second")["status"] == "Running"


def test_target_that_is_no_member_is_refused(env: Env) -> None:
    error = one_line_error(
        env.cli(
            "m1", "restore", "instance", env.runs["m1"], "c1", "--as", "x", "--target", "nosuch"
        )
    )
    assert "nosuch" in error and "m1, m2, m3" in error


def test_target_member_offline_is_refused_with_nothing_made(env: Env) -> None:
    m3 = env.cluster.member("m3")
    before = sorted(i["name"] for i in env.query("/1.0/instances?all-projects=true&recursion=1"))
    m3.daemon.stop_daemon()
    try:
        error = one_line_error(
            env.cli(
                "m1",
                "restore",
                "instance",
                env.runs["m1"],
                "c1",
                "--as",
                "c1-lost",
                "--target",
                "m3",
            )
        )
    finally:
        m3.daemon.start_daemon()
        env.cluster.wait_online("m3")
    assert "m3" in error and "--target" in error
    after = sorted(i["name"] for i in env.query("/1.0/instances?all-projects=true&recursion=1"))
    assert after == before


# --- prune -------------------------------------------------------------------------------------


def test_prune_on_a_member_keeps_the_other_members_runs(env: Env) -> None:
    done = env.cli("m1", "backup", "--json")
    assert done.returncode == 0, done.stderr
    newer = json.loads(done.stdout)["run"]
    done = env.cli("m1", "prune")
    assert done.returncode == 0, done.stderr
    assert "runs of other members (m2, m3) left alone" in done.stdout
    names = {
        a["name"] for a in json.loads(borg("list", "--json", str(env.repo)).stdout)["archives"]
    }
    assert names == {newer, env.runs["m2"], env.runs["m3"]}
    env.runs["m1"] = newer


# --- a lost member (last: the cluster is not the same afterwards) -------------------------------


def test_lost_member_rebuilt_on_a_fresh_member(env: Env) -> None:
    run = env.runs["m3"]
    env.cluster.lose("m3")
    assert "c3" not in {
        i["name"] for i in env.query("/1.0/instances?all-projects=true&recursion=1")
    }
    fresh = env.cluster.join("m4", env.cluster.hosts[3])
    env.configs["m4"] = member_config(env.cluster, env.root, fresh)
    done = env.cli("m4", "restore", "all", run, "--target", "m4")
    assert done.returncode == 0, done.stderr
    restored = env.query("/1.0/instances/c3")
    assert restored["location"] == "m4"
    fresh.incus("start", "c3")
    assert env.cluster.first.server.checksums("c3", CHECKED) == env.sums["c3"]
