"""Hook mode just in time: the gate keeper `hook pre` leaves quiesces each instance only while
another program's Borg (real borgmatic here) reads it, once per Borg pass, and releases
everything whichever process dies."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli import BIN, ROOT, borg_env, borgmatic_config, incus_config, run_cli, tool_env
from harness.incusd import wait_for
from harness.server import BTRFS_POOL, DEFAULT_POOL, IncusServer
from phases import journal_steps, pause_env, stopped

from incus_borg.host import mounts, processes

pytestmark = pytest.mark.incus

DIRS = ["kp-d0", "kp-d1", "kp-d2"]
BTRFS = ["kp-b0", "kp-b1"]
NAMES = DIRS + BTRFS
SIZE = 24_000_000  # bytes of data in each dir container
SAMPLE = 0.03  # seconds between two samples of the states
EXAMPLE = ROOT / "examples/borgmatic/config.yaml"


@dataclass
class Env:
    """Three dir containers (freeze) and two btrfs ones (snapshot), a config for them, and
    a borgmatic config with two repositories."""

    server: IncusServer
    root: Path
    config: Path
    borgmatic: Path

    @property
    def record(self) -> list[tuple[str, dict[str, Any]]]:
        """What the last keeper wrote."""
        lines = (self.root / "staging.keeper").read_text().splitlines()
        return [next(iter(json.loads(line).items())) for line in lines]

    def windows(self, name: str) -> list[dict[str, Any]]:
        return [f for kind, f in self.record if kind == "window" and f["ref"] == f"default/{name}"]

    def temporary_snapshots(self, name: str) -> list[str]:
        snaps = self.server.daemon.query(f"/1.0/instances/{name}/snapshots")
        return [s for s in snaps if "incus-borg-" in s]

    def assert_released(self) -> None:
        """Everything runs, no temporary snapshot, nothing mounted, no journal, no keeper."""
        for name in NAMES:
            assert self.server.state(name) == "Running", name
            assert not self.temporary_snapshots(name), name
        assert not mounts.mounts_below(self.root / "staging")
        assert not (self.root / "staging.journal").exists()
        assert not keepers(), "a gate keeper is still there"

    def borgmatic_env(self, pause: str | None = None) -> dict[str, str]:
        env = tool_env(self.config)
        return pause_env(pause, env) if pause else env


def keepers() -> list[int]:
    """Gate keepers of this test's runs (forked `hook pre`s that outlived their parent)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        argv = processes.cmdline(int(proc.name))
        if "hook" in argv and "pre" in argv and processes.parent(int(proc.name)) in (0, 1):
            found.append(int(proc.name))
    return found


def kept(root: Path) -> bool:
    """Whether the journal names a keeper."""
    return any(s["op"] == "end_keeper" for s in journal_steps(root / "staging"))


def keeper_pid(root: Path) -> int:
    """The keeper the journal names."""
    steps = [s for s in journal_steps(root / "staging") if s["op"] == "end_keeper"]
    assert steps, journal_steps(root / "staging")
    return int(steps[0]["pid"])


@pytest.fixture(scope="module")
def env(incus_server: IncusServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("keeper")
    for name in DIRS:
        files = {"/root/data.bin": (os.urandom(SIZE), 0, 0, 0o600)}
        incus_server.launch(name, pool=DEFAULT_POOL, files=files)
    for name in BTRFS:
        incus_server.launch(name, pool=BTRFS_POOL, files={"/root/f": (b"f\n", 0, 0, 0o644)})
    config = incus_config(incus_server, root, instances=NAMES)
    data = borgmatic_config(EXAMPLE, root, root / "repo-a", config)
    data["repositories"] = [
        {"path": str(root / "repo-a"), "label": "a"},
        {"path": str(root / "repo-b"), "label": "b"},
    ]
    path = root / "borgmatic.yaml"
    path.write_text(yaml.safe_dump(data))
    made = Env(incus_server, root, config, path)
    created = borgmatic(made, "repo-create", "--encryption", "repokey-blake2")
    assert created.returncode == 0, created.stderr
    yield made
    for name in NAMES:
        incus_server.delete(name)


def borgmatic(env: Env, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "borgmatic"), "-c", str(config or env.borgmatic), *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env.borgmatic_env())


@dataclass
class Sampler:
    """Every SAMPLE seconds: which dir containers are frozen (read from their cgroups) and
    which btrfs containers have a temporary snapshot (read from the pool)."""

    env: Env
    samples: list[tuple[float, set[str], set[str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.states = {name: freezer(self.env.server, name) for name in DIRS}
        pool = self.env.server.daemon.incus_dir / "storage-pools" / BTRFS_POOL
        self.snapshots = {name: pool / "containers-snapshots" / name for name in BTRFS}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.done.is_set():
            frozen = {n for n, (path, said) in self.states.items() if said in path.read_text()}
            snapped = {
                n
                for n, path in self.snapshots.items()
                if path.is_dir() and any("incus-borg-" in p.name for p in path.iterdir())
            }
            self.samples.append((time.monotonic(), frozen, snapped))
            time.sleep(SAMPLE)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def episodes(self, name: str) -> list[tuple[float, float]]:
        """When `name` was seen frozen: (first, last sample) of each time."""
        found: list[tuple[float, float]] = []
        was = False
        for at, frozen, _ in self.samples:
            if name in frozen:
                found = [*found[:-1], (found[-1][0], at)] if was else [*found, (at, at)]
            was = name in frozen
        return found


def freezer(server: IncusServer, name: str) -> tuple[Path, str]:
    """Where the kernel says whether the container is frozen, and what it says then: the v1
    freezer's freezer.state, else cgroup v2's cgroup.events."""
    pid = server.daemon.query(f"/1.0/instances/{name}/state")["pid"]
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    found = {line.split(":", 2)[1]: Path(line.split(":", 2)[2]) for line in lines}
    if "freezer" in found:
        where, file, frozen = Path("/sys/fs/cgroup/freezer"), "freezer.state", "FROZEN"
        cgroup = found["freezer"]
    else:
        where, file, frozen = Path("/sys/fs/cgroup"), "cgroup.events", "frozen 1"
        cgroup = found[""]
    top = next(i for i, part in enumerate(cgroup.parts) if part.startswith("lxc.payload"))
    state = where.joinpath(*cgroup.parts[1 : top + 1], file)
    assert frozen not in state.read_text(), state
    return state, frozen


WINDOW = re.compile(
    r"instance default/(\S+): (frozen|snapshotted) 1 time\(s\) while Borg read it: (.*)"
)
LENGTHS = re.compile(r"([\d.]+) s \(Incus ([\d.]+) s to quiesce, Borg ([\d.]+) s to read\)")


def test_borgmatic_freezes_each_instance_only_while_its_borg_reads_it(env: Env) -> None:
    """borgmatic runs `hook pre`, Borg and `hook post` once per repository: each pass
    freezes each dir container once, one at a time, for about as long as Borg reads it;
    each btrfs container gets a snapshot just then; nothing is frozen between the passes."""
    with Sampler(env) as sampler:
        done = borgmatic(env, "create", "--verbosity", "1")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("gate keeper (pid") == 2, done.stderr
    env.assert_released()
    assert sampler.samples, "no sample"
    together = [s for s in sampler.samples if len(s[1]) > 1]
    assert not together, together[:3]
    said: dict[str, list[str]] = {}
    for line in done.stderr.splitlines():
        if found := WINDOW.search(line):
            name, _, windows = found.groups()
            said.setdefault(name, []).append(windows)
    assert sorted(said) == sorted(NAMES), done.stderr
    for name in DIRS:
        assert len(said[name]) == 2, said  # once per pass
        for windows in said[name]:
            # Beyond the time Incus takes to freeze (liblxc's cgroup v1 freezer may sleep a
            # second before it answers), the window is Borg's read and little more.
            ((length, took, read),) = LENGTHS.findall(windows)
            assert float(length) - float(took) <= 1.2 * float(read), (name, windows)
        assert len(sampler.episodes(name)) == 2, name
    firsts = [sampler.episodes(name)[0] for name in DIRS]
    seconds = [sampler.episodes(name)[1] for name in DIRS]
    assert max(end for _, end in firsts) < min(start for start, _ in seconds), (firsts, seconds)
    for name in BTRFS:
        assert len(said[name]) == 2, said
    while_snapshotted = [s for s in sampler.samples if s[2]]
    assert while_snapshotted, "no temporary snapshot was ever seen"
    assert all(not frozen and len(snapped) == 1 for _, frozen, snapped in while_snapshotted)
    before = [s for s in sampler.samples if s[0] < min(start for start, _ in firsts)]
    assert not any(snapped for _, _, snapped in before[:1]), "a snapshot before Borg read"


def keeper_paused_at(env: Env, point: str, repo: Path) -> tuple[int, subprocess.Popen[str]]:
    """`hook pre`, then a plain `borg create` of the staging tree into a new repository (as
    another program's Borg): the keeper and that Borg, once the keeper stopped at `point`."""
    pause = pause_env(point, tool_env(env.config))
    pre = subprocess.run(
        [str(BIN / "incus-borg"), "hook", "pre"], env=pause, capture_output=True, text=True
    )
    assert pre.returncode == 0, pre.stderr
    keeper = keeper_pid(env.root)
    init = [str(BIN / "borg"), "init", "-e", "none", str(repo)]
    assert subprocess.run(init, env=borg_env()).returncode == 0
    create = subprocess.Popen(
        [str(BIN / "borg"), "create", f"{repo}::staging", "."], cwd=env.root / "staging",
        env=borg_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if not wait_for(lambda: stopped(keeper), 120, interval=0.05):
        create.kill()
        raise AssertionError(f"the keeper never paused at {point}")
    return keeper, create


def test_keeper_killed_mid_run_lets_borg_finish(env: Env, tmp_path: Path) -> None:
    """A Borg at the gate of kp-d1 while the keeper is killed: the kernel lets it through,
    it reads kp-d2 live, and `hook post` exits 1 naming kp-d2."""
    keeper, create = keeper_paused_at(env, "held:default/kp-d1", tmp_path / "repo")
    try:
        assert env.server.state("kp-d1") == "Frozen"
        os.kill(keeper, 9)
        assert create.wait(timeout=300) == 0, create.stderr
    finally:
        if create.poll() is None:
            create.kill()
        post = run_cli("hook", "post", config=env.config)
    assert post.returncode == 1, post.stderr
    killed = [line for line in post.stderr.splitlines() if "gate keeper was killed" in line]
    assert killed and "default/kp-d2" in killed[0], post.stderr
    assert "default/kp-d1 stayed quiesced" in killed[0], killed
    env.assert_released()


def test_a_snapshot_over_staging_never_covers_a_shared_live_mount(env: Env, tmp_path: Path) -> None:
    """On a systemd host mounts are shared: the btrfs snapshot the keeper mounts over kp-b0's
    live data in staging must stay there, not propagate onto the live container itself."""
    pool = env.server.daemon.incus_dir / "storage-pools" / BTRFS_POOL
    live = pool / "containers" / "kp-b0"
    assert mounts.is_mounted(pool)
    subprocess.run(["mount", "--make-shared", str(pool)], check=True)
    try:
        keeper, create = keeper_paused_at(env, "held:default/kp-b0", tmp_path / "repo")
        try:
            assert env.temporary_snapshots("kp-b0")
            assert not mounts.is_mounted(live), "the snapshot covers the live container"
            os.kill(keeper, 18)
            assert create.wait(timeout=300) == 0, create.stderr
        finally:
            if processes.start_time(keeper) is not None:
                os.kill(keeper, 18)
            if create.poll() is None:
                create.kill()
            post = run_cli("hook", "post", config=env.config)
        assert post.returncode == 0, post.stderr
        assert not mounts.is_mounted(live)
        env.assert_released()
    finally:
        subprocess.run(["mount", "--make-private", str(pool)], check=True)


def test_borgmatic_killed_mid_run_the_keeper_releases_everything(env: Env) -> None:
    argv = [str(BIN / "borgmatic"), "-c", str(env.borgmatic), "create"]
    run = subprocess.Popen(
        argv, env=env.borgmatic_env("held:default/kp-d1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    keeper = None
    try:
        assert wait_for(lambda: kept(env.root), 120, interval=0.05)
        keeper = keeper_pid(env.root)
        assert wait_for(lambda: stopped(keeper), 120, interval=0.05), "the keeper never paused"
        os.killpg(run.pid, 9)  # borgmatic, its borg waiting at the gate too
        run.wait()
        assert env.server.state("kp-d1") == "Frozen"
        os.kill(keeper, 18)  # SIGCONT: it finds borgmatic gone
        assert wait_for(lambda: processes.start_time(keeper) is None, 30, interval=0.05)
        for name in NAMES:
            assert env.server.state(name) == "Running", name
            assert not env.temporary_snapshots(name), name
        ends = [f for kind, f in env.record if kind == "end"]
        assert "is gone" in ends[-1]["why"], ends
    finally:
        if keeper is not None and processes.start_time(keeper) is not None:
            os.kill(keeper, 18)
        post = run_cli("hook", "post", "--failed", config=env.config)
    assert post.returncode == 1 and "ended by itself" in post.stderr, post.stderr
    env.assert_released()


def test_keeper_ends_at_its_lifetime_and_the_next_run_recovers(env: Env, tmp_path: Path) -> None:
    config = incus_config(
        env.server, tmp_path, instances=DIRS[:1], keeper_lifetime="3s",
    )  # fmt: skip
    assert run_cli("init", config=config).returncode == 0
    pre = run_cli("hook", "pre", config=config)
    assert pre.returncode == 0, pre.stderr
    assert "after 3s (keeper_lifetime)" in pre.stderr, pre.stderr
    keeper = keeper_pid(tmp_path)
    item = tmp_path / "staging/instances/default/kp-d0"
    fd = os.open(item, os.O_RDONLY | os.O_DIRECTORY)  # waits until the keeper froze it
    try:
        assert env.server.state("kp-d0") == "Frozen"
        assert wait_for(lambda: processes.start_time(keeper) is None, 60, interval=0.1)
        assert env.server.state("kp-d0") == "Running"
    finally:
        os.close(fd)
    again = run_cli("backup", config=config)  # hook post never ran: the next run recovers
    assert again.returncode == 1, again.stderr
    assert "left" in again.stderr and "undoing them first" in again.stderr, again.stderr
    assert env.server.state("kp-d0") == "Running"
    assert not mounts.mounts_below(tmp_path / "staging")
    assert not (tmp_path / "staging.journal").exists()


def test_whole_run_hold_is_said_and_holds_until_post(env: Env, tmp_path: Path) -> None:
    config = incus_config(env.server, tmp_path, instances=DIRS[:1], hook_hold="whole-run")
    pre = run_cli("hook", "pre", config=config)
    try:
        assert pre.returncode == 0, pre.stderr
        assert "whole-run hold" in pre.stderr and "restic" in pre.stderr, pre.stderr
        assert env.server.state("kp-d0") == "Frozen"
        assert not keepers()
    finally:
        post = run_cli("hook", "post", config=config)
    assert post.returncode == 0, post.stderr
    assert env.server.state("kp-d0") == "Running"
