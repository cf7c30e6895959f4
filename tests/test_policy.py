"""Per-instance policy from `user.incus-borg.*` keys (on instances, profiles and custom
volumes) and the pre/post commands run inside instances, against a private Incus, real
repositories and the real borgmatic."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli import PASSPHRASE, borg, incus_config, one_line_error, run_cli
from harness.incusd import IncusError, cmdline, wait_for
from harness.server import IncusServer

from incus_borg import layout

pytestmark = pytest.mark.incus

K = "user.incus-borg."
PROFILE = "backup-db"
PRE = 'echo "dump $RANDOM$RANDOM $DB_NAME" > /root/dump.sql'
POST = "echo after >> /root/dump.sql; touch /root/post-ran"
OWN_POST = "touch /root/post-own"
EX_FILES = {
    "/var/cache/apt/pkg.bin": (b"cache\n" * 100, 0, 0, 0o644),
    "/tmp/scratch.tmp": (b"scratch\n", 0, 0, 0o644),
    "/tmp/keep.txt": (b"keep\n", 0, 0, 0o644),
    "/root/data.txt": (b"data\n", 0, 0, 0o600),
}
EX_ROOTS = ("backup/container/rootfs", "backup/snapshots/s1/rootfs")
INSTANCES = (
    "po-db1", "po-db2", "po-skip", "po-ex", "po-off", "po-stop", "po-zz", "po-fail", "po-slow",
)  # fmt: skip
VOLUMES = ("po-vol", "po-vskip")
SLEEPS = re.compile(r"sleep 100[0-9]$")


@dataclass
class Env:
    """The instances, a config reading the whole server, and the run it made first."""

    server: IncusServer
    root: Path
    config: Path
    run: str
    stderr: str
    paths: set[str]

    def incus(self, *args: str) -> None:
        self.server.daemon.incus(*args)

    def rootfs(self, name: str) -> Path:
        """An instance's root filesystem, as the host sees it."""
        pool = "fast" if name == "po-db2" else "default"
        return layout.instance_data(self.server.daemon.incus_dir, pool, "default", name) / "rootfs"

    def cat(self, name: str, path: str) -> str | None:
        """A file of an instance, read from the host (no `incus exec`), None when missing."""
        try:
            return (self.rootfs(name) / path.lstrip("/")).read_text()
        except FileNotFoundError:
            return None

    def extract(self, run: str, path: str, repo: str = "repo") -> str:
        return borg("extract", "--stdout", f"{self.root / repo}::{run}", path).stdout

    def manifest(self, run: str, config: Path | None = None) -> dict[str, Any]:
        done = run_cli("list", run, "--json", config=config or self.config)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    @staticmethod
    def leftover_sleeps() -> list[int]:
        """The processes (seen from the host) of this module's pre commands: `sleep 100N`."""
        return [
            int(p.name)
            for p in Path("/proc").glob("[0-9]*")
            if SLEEPS.match(" ".join(cmdline(int(p.name))))
        ]


def item(manifest: dict[str, Any], name: str) -> dict[str, Any]:
    found = [i for i in manifest["instances"] + manifest["volumes"] if i["name"] == name]
    assert len(found) == 1, [i["name"] for i in manifest["instances"]]
    return dict(found[0])


def archive_paths(repo: Path, run: str) -> set[str]:
    return set(borg("list", "--short", f"{repo}::{run}").stdout.splitlines())


def comment(repo: Path, run: str) -> str:
    return str(
        json.loads(borg("info", "--json", f"{repo}::{run}").stdout)["archives"][0]["comment"]
    )


def _populate(server: IncusServer) -> None:
    incus = server.daemon.incus
    incus("profile", "create", PROFILE)
    for key, value in {"mode": "freeze", "pre": PRE, "post": POST}.items():
        incus("profile", "set", PROFILE, K + key, value)
    for name, pool in (("po-db1", "default"), ("po-db2", "fast")):
        server.launch(name, pool=pool, start=False)
        incus("profile", "add", name, PROFILE)
        incus("config", "set", name, "environment.DB_NAME", f"db-of-{name}")
        server.start(name)
    incus("config", "set", "po-db2", K + "mode", "snapshot")
    incus("config", "set", "po-db2", K + "post", OWN_POST)
    server.launch("po-ex", files=EX_FILES)
    incus("snapshot", "create", "po-ex", "s1")
    incus("config", "set", "po-ex", K + "exclude", "/var/cache/*,/tmp/*.tmp")
    server.launch("po-off", start=False)
    incus("config", "set", "po-off", K + "pre", "touch /root/should-not")
    for name, mode in (("po-skip", "skip"), ("po-stop", "stop"), ("po-zz", None)):
        server.launch(name)
        if mode:
            incus("config", "set", name, K + "mode", mode)
    for name in ("po-fail", "po-slow"):
        server.launch(name)
    incus("storage", "volume", "create", "default", "po-vol")
    incus("storage", "volume", "attach", "default", "po-vol", "po-zz", "/mnt/vol")
    server.exec(
        "po-zz",
        "sh",
        "-c",
        "mkdir /mnt/vol/cache && echo c > /mnt/vol/cache/x; echo k > /mnt/vol/keep",
    )
    incus("storage", "volume", "snapshot", "create", "default", "po-vol", "vs1")
    incus("storage", "volume", "set", "default", "po-vol", K + "exclude", "/cache/*")
    incus("storage", "volume", "create", "default", "po-vskip")
    incus("storage", "volume", "set", "default", "po-vskip", K + "mode", "skip")


@pytest.fixture(scope="module")
def env(incus_server: IncusServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("policy")
    try:
        _populate(incus_server)
        config = incus_config(incus_server, root)
        assert run_cli("init", config=config).returncode == 0
        done = run_cli("backup", "--json", config=config)  # the whole server
        assert done.returncode == 0, done.stderr
        run = json.loads(done.stdout)["run"]
        yield Env(incus_server, root, config, run, done.stderr, archive_paths(root / "repo", run))
    finally:
        for name in INSTANCES:
            incus_server.daemon.incus("delete", "--force", name, check=False)
        for volume in VOLUMES:
            incus_server.daemon.incus("storage", "volume", "delete", "default", volume, check=False)
        incus_server.daemon.incus("profile", "delete", PROFILE, check=False)


def test_pre_dump_is_archived_as_it_was_and_post_ran(env: Env) -> None:
    stem = "instances/default/{}/backup/container/rootfs/root/dump.sql"
    first = env.extract(env.run, stem.format("po-db1"))
    assert first.startswith("dump ") and "db-of-po-db1" in first  # the instance's environment
    assert env.cat("po-db1", "/root/dump.sql") == first + "after\n"  # post ran after the read
    assert env.cat("po-db1", "/root/post-ran") is not None
    second = env.extract(env.run, stem.format("po-db2"))
    assert "db-of-po-db2" in second and env.cat("po-db2", "/root/dump.sql") == second
    recorded = env.manifest(env.run)
    for name in ("po-db1", "po-db2"):
        record = item(recorded, name)
        assert (record["pre_exit"], record["post_exit"], record["failed"]) == (0, 0, None)
        assert record["pre_duration"] > 0 and record["post_duration"] > 0
    assert "instance default/po-db1: pre command ran" in env.stderr
    assert "instance default/po-db1: post command ran" in env.stderr


def test_profile_keys_act_and_instance_keys_override(env: Env) -> None:
    recorded = env.manifest(env.run)
    db1, db2 = item(recorded, "po-db1"), item(recorded, "po-db2")
    assert (db1["mode"], db1["mode_source"]) == ("freeze", f"profile {PROFILE}")
    assert (db1["pre"], db1["post"], db1["timeout"]) == (PRE, POST, 300)
    assert (db2["mode"], db2["mode_source"]) == ("snapshot", "instance")
    assert (db2["pre"], db2["post"]) == (PRE, OWN_POST)  # pre from the profile, post its own
    assert env.cat("po-db2", "/root/post-own") is not None
    assert env.cat("po-db2", "/root/post-ran") is None
    zz = item(recorded, "po-zz")
    assert (zz["mode"], zz["mode_source"], zz["pre"]) == ("freeze", "configuration", None)


def test_stopped_instance_runs_no_command(env: Env) -> None:
    assert "instance default/po-off is stopped: its pre and post commands are not run" in env.stderr
    record = item(env.manifest(env.run), "po-off")
    assert (record["state"], record["pre_exit"], record["failed"]) == ("Stopped", None, None)
    assert "instances/default/po-off/backup/container/rootfs/root/should-not" not in env.paths


def test_dry_run_shows_modes_sources_commands_and_skips(env: Env) -> None:
    before = env.cat("po-db1", "/root/dump.sql")
    done = run_cli("backup", "--dry-run", config=env.config)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for line in (
        f"instance default/po-db1 on default (dir): freeze (mode from profile {PROFILE})",
        "instance default/po-db2 on fast (btrfs): snapshot (mode from instance)",
        "instance default/po-zz on default (dir): freeze (mode from configuration)",
        "instance default/po-stop on default (dir): stop (mode from instance)",
        f"  pre: {PRE}\n  post: {OWN_POST}\n  timeout: 300 s each",
        "  exclude: /var/cache/*, /tmp/*.tmp",
        "volume default/po-vol on default (dir): freeze (mode from configuration)",
        "  exclude: /cache/*",
        "  pre and post: not run, the instance is stopped",
        "instance default/po-skip on default: skipped (mode skip from instance)",
        "volume default/po-vskip on default: skipped (mode skip from volume)",
        f"`hook pre` writes them to {env.root / 'staging.excludes'}",
    ):
        assert line in out, (line, out)
    assert env.cat("po-db1", "/root/dump.sql") == before  # no pre ran
    overridden = run_cli("backup", "--dry-run", "--mode", "freeze", config=env.config).stdout
    assert (
        "instance default/po-skip on default (dir): freeze (mode from command line)" in overridden
    )
    assert (
        "instance default/po-stop on default (dir): freeze (mode from command line)" in overridden
    )


def test_skip_leaves_the_instance_out_and_the_run_complete(env: Env) -> None:
    recorded = env.manifest(env.run)
    assert "po-skip" not in {i["name"] for i in recorded["instances"]}
    assert "po-vskip" not in {v["name"] for v in recorded["volumes"]}
    assert {"po-db1", "po-zz", "po-ex"} <= {i["name"] for i in recorded["instances"]}
    skipped = ("instances/default/po-skip", "volumes/default/default/po-vskip")
    assert not [p for p in env.paths if p.startswith(skipped)]
    listed = run_cli("list", env.run, config=env.config)
    assert listed.returncode == 0 and "po-db1" in listed.stdout
    assert "po-skip" not in listed.stdout and "po-vskip" not in listed.stdout
    assert recorded["partial"] is False
    assert comment(env.root / "repo", env.run) == "incus-borg run=complete"
    assert "instance default/po-skip: skipped (mode skip from instance)" in env.stderr


def test_exclude_leaves_paths_out_and_the_restored_instance_starts(env: Env) -> None:
    stem = "instances/default/po-ex/"
    for root in EX_ROOTS:
        assert stem + root + "/var/cache/apt/pkg.bin" not in env.paths
        assert stem + root + "/var/cache/apt" not in env.paths
        assert stem + root + "/tmp/scratch.tmp" not in env.paths
        assert {stem + root + "/var/cache", stem + root + "/tmp/keep.txt"} <= env.paths
        assert stem + root + "/root/data.txt" in env.paths
    volume = "volumes/default/default/po-vol/backup/"
    for root in ("volume", "volume-snapshots/vs1"):
        assert volume + root + "/cache/x" not in env.paths
        assert volume + root + "/keep" in env.paths
    record = item(env.manifest(env.run), "po-ex")
    assert record["excludes"] == ["/var/cache/*", "/tmp/*.tmp"]
    assert item(env.manifest(env.run), "po-vol")["excludes"] == ["/cache/*"]
    done = run_cli(
        "restore", "instance", env.run, "po-ex", "--as", "po-ex-r", "--start", config=env.config
    )
    try:
        assert done.returncode == 0, done.stderr
        assert env.server.state("po-ex-r") == "Running"
        assert env.cat("po-ex-r", "/var/cache/apt/pkg.bin") is None
        assert env.cat("po-ex-r", "/tmp/scratch.tmp") is None
        assert env.cat("po-ex-r", "/tmp/keep.txt") == "keep\n"
        assert env.cat("po-ex-r", "/root/data.txt") == "data\n"
        assert (env.rootfs("po-ex-r") / "var/cache").is_dir()
    finally:
        env.server.delete("po-ex-r")


def test_stop_mode_instance_is_stopped_only_while_it_is_read(env: Env, tmp_path: Path) -> None:
    names = ["po-ex", "po-stop", "po-zz"]
    config = incus_config(env.server, tmp_path, instances=names, mode="freeze")
    assert run_cli("init", config=config).returncode == 0
    env.server.push_file("po-stop", "/root/big.bin", os.urandom(60_000_000))
    samples: list[dict[str, str]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                samples.append({name: env.server.state(name) for name in names})
            except IncusError:  # the daemon is down while its database is copied
                continue

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        backup = run_cli("backup", "--json", config=config)
    finally:
        done.set()
        sampler.join()
        env.server.exec("po-stop", "rm", "/root/big.bin")
    assert backup.returncode == 0, backup.stderr
    stopped = [s for s in samples if s["po-stop"] == "Stopped"]
    assert stopped, "po-stop was never seen stopped"
    assert all(s["po-ex"] != "Frozen" and s["po-zz"] != "Frozen" for s in stopped), stopped
    frozen = [s for s in samples if "Frozen" in (s["po-ex"], s["po-zz"])]
    assert all(s["po-stop"] != "Stopped" for s in frozen), frozen
    assert env.server.wait_state("po-stop", "Running")
    recorded = env.manifest(json.loads(backup.stdout)["run"], config)
    assert (item(recorded, "po-stop")["mode"], item(recorded, "po-stop")["mode_source"]) == (
        "stop",
        "instance",
    )
    assert item(recorded, "po-ex")["mode"] == "freeze"


FAIL_PRE = "sleep 1001 & setsid sleep 1002 & echo 'cannot dump: disk full' >&2; exit 3"
SLOW_PRE = "(sleep 1003 &); echo 'dumping slowly' >&2; sleep 1004"


def test_failing_and_timed_out_pre_leave_the_instance_out(env: Env) -> None:
    policies = {
        "po-fail": {"pre": FAIL_PRE, "post": "touch /root/post-fail"},
        "po-slow": {"pre": SLOW_PRE, "post": "touch /root/post-slow", "timeout": "2"},
    }
    for name, keys in policies.items():
        for key, value in keys.items():
            env.incus("config", "set", name, K + key, value)
    try:
        done = run_cli("backup", "--json", config=env.config)  # the whole server
    finally:
        for name, keys in policies.items():
            for key in keys:
                env.incus("config", "unset", name, K + key)
    assert done.returncode == 1, done.stderr
    assert (
        "warning: instance default/po-fail left out of this run: its pre command exited 3: "
        "cannot dump: disk full"
    ) in done.stderr
    assert (
        "warning: instance default/po-slow left out of this run: its pre command timed out "
        "after 2 s (user.incus-borg.timeout) and was killed: dumping slowly"
    ) in done.stderr
    run = json.loads(done.stdout)["run"]
    recorded = env.manifest(run)
    assert recorded["partial"] is True
    assert comment(env.root / "repo", run) == "incus-borg run=partial"
    assert item(recorded, "po-fail")["failed"] == "its pre command exited 3"
    assert item(recorded, "po-fail")["pre_exit"] == 3
    assert "timed out" in item(recorded, "po-slow")["failed"]
    assert item(recorded, "po-db1")["failed"] is None
    paths = archive_paths(env.root / "repo", run)
    assert "instances/default/po-db1/backup/container/rootfs/root/dump.sql" in paths
    assert not any(
        p.startswith(("instances/default/po-fail", "instances/default/po-slow")) for p in paths
    )
    for name, post in (("po-fail", "/root/post-fail"), ("po-slow", "/root/post-slow")):
        assert env.cat(name, post) is not None
    assert env.leftover_sleeps() == []
    listed = run_cli("list", run, config=env.config).stdout
    assert [line for line in listed.splitlines() if "po-fail" in line and "FAILED" in line]
    refused = one_line_error(run_cli("restore", "instance", run, "po-fail", config=env.config))
    assert "'po-fail' was left out of" in refused and "its pre command exited 3" in refused


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill-9"])
def test_interrupted_pre_is_ended_and_its_post_runs(
    env: Env, tmp_path: Path, signum: signal.Signals
) -> None:
    name = "po-zz"
    keys = {"pre": "touch /root/pre-started; sleep 1005", "post": "touch /root/post-k"}
    for key, value in keys.items():
        env.incus("config", "set", name, K + key, value)
    argv = [sys.executable, "-m", "incus_borg", "-c", str(env.config), "backup", "--instance", name]
    log = (tmp_path / "log").open("w")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    try:
        assert wait_for(lambda: env.cat(name, "/root/pre-started") is not None, 60)
        os.kill(proc.pid, signum)
        proc.wait(60)
        if signum == signal.SIGKILL:
            assert env.leftover_sleeps(), "the pre command was not running any more"
            assert env.cat(name, "/root/post-k") is None
            env.incus("config", "set", name, K + "pre", "true")
            again = run_cli("backup", "--instance", name, config=env.config)
            assert again.returncode == 1, again.stderr
            assert "left 1 step(s) to undo" in again.stderr
        else:
            assert proc.returncode == 2
        assert env.cat(name, "/root/post-k") is not None
        assert env.leftover_sleeps() == []
        assert not (env.root / "staging.journal").exists()
        assert env.server.state(name) == "Running"
    finally:
        proc.kill()
        proc.wait()
        for key in keys:
            env.incus("config", "unset", name, K + key)
        env.server.exec(name, "rm", "-f", "/root/pre-started", "/root/post-k")


def test_bad_keys_are_refused_before_anything_is_quiesced(env: Env) -> None:
    before = env.cat("po-db1", "/root/dump.sql")
    backup = ["backup", "--instance", "po-db1", "--instance", "po-zz"]
    env.incus("config", "set", "po-zz", K + "mode", "sometimes")
    try:
        error = one_line_error(run_cli(*backup, config=env.config))
    finally:
        env.incus("config", "unset", "po-zz", K + "mode")
    assert (
        "instance default/po-zz: user.incus-borg.mode='sometimes' (set on the instance) is not "
        "one of auto, snapshot, freeze, stop, none, skip"
    ) in error
    env.incus("profile", "set", PROFILE, K + "bogus", "1")
    try:
        error = one_line_error(run_cli(*backup, config=env.config))
        hook = one_line_error(run_cli("hook", "pre", "--instance", "po-db1", config=env.config))
    finally:
        env.incus("profile", "unset", PROFILE, K + "bogus")
    for message in (error, hook):
        assert (
            f"instance default/po-db1: unknown key user.incus-borg.bogus (set on the profile "
            f"{PROFILE})"
        ) in message
    assert env.cat("po-db1", "/root/dump.sql") == before  # no pre ran
    assert not (env.root / "staging.journal").exists()
    assert {env.server.state(n) for n in ("po-db1", "po-zz")} == {"Running"}


def test_hook_mode_with_borgmatic_runs_pre_at_hook_pre_and_post_at_hook_post(
    env: Env, tmp_path: Path
) -> None:
    config = incus_config(env.server, tmp_path, instances=["po-db1", "po-ex"])
    fragment = run_cli("config", "generate", "--borgmatic", config=config)
    assert fragment.returncode == 0, fragment.stderr
    data = yaml.safe_load(fragment.stdout)
    assert data["exclude_from"] == [str(tmp_path / "staging.excludes")]
    data |= {
        "repositories": [{"path": str(tmp_path / "repo"), "label": "local"}],
        "encryption_passphrase": PASSPHRASE,
    }
    borgmatic_config = tmp_path / "borgmatic.yaml"
    borgmatic_config.write_text(yaml.safe_dump(data))
    bin_dir = Path(sys.executable).parent
    tool_env = {k: v for k, v in os.environ.items() if not k.startswith(("BORG_", "INCUS_BORG"))}
    tool_env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"

    def borgmatic(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(bin_dir / "borgmatic"), "-c", str(borgmatic_config), *args]
        return subprocess.run(argv, capture_output=True, text=True, env=tool_env, check=False)

    assert borgmatic("repo-create", "--encryption", "repokey-blake2").returncode == 0
    env.server.exec("po-db1", "rm", "-f", "/root/post-ran")
    created = borgmatic("create", "--verbosity", "1")
    assert created.returncode == 0, created.stderr
    log = created.stderr
    pre = log.index("instance default/po-db1: pre command ran")
    assert (
        pre
        < log.index("just in time while Borg reads it")
        < log.index("instance default/po-db1: post command ran")
    )
    (archive,) = json.loads(borg("list", "--json", str(tmp_path / "repo")).stdout)["archives"]
    name = archive["name"]
    dump = env.extract(name, "instances/default/po-db1/backup/container/rootfs/root/dump.sql",
                       repo=str(tmp_path / "repo"))  # fmt: skip
    assert env.cat("po-db1", "/root/dump.sql") == dump + "after\n"  # post ran after the read
    assert env.cat("po-db1", "/root/post-ran") is not None
    paths = archive_paths(tmp_path / "repo", name)
    for root in EX_ROOTS:  # the excludes reached borgmatic's borg
        assert f"instances/default/po-ex/{root}/var/cache/apt/pkg.bin" not in paths
        assert f"instances/default/po-ex/{root}/tmp/keep.txt" in paths
    recorded = json.loads(env.extract(name, "manifest.json", repo=str(tmp_path / "repo")))
    assert recorded["hook_mode"] and item(recorded, "po-db1")["pre_exit"] == 0
    # After a failure the other program runs `hook post --failed`: post runs there too.
    env.server.exec("po-db1", "rm", "-f", "/root/post-ran")
    assert run_cli("hook", "pre", config=config).returncode == 0
    assert env.cat("po-db1", "/root/post-ran") is None
    failed = run_cli("hook", "post", "--failed", config=config)
    assert failed.returncode == 0, failed.stderr
    assert "instance default/po-db1: post command ran" in failed.stderr
    assert env.cat("po-db1", "/root/post-ran") is not None
