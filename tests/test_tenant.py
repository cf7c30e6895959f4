"""A tenant's keys reach their own instance only: hostile `user.incus-borg.*` values on one
instance either stop the run with one line (exit 2) or leave every other instance, the
database and subuid/subgid in the archive; `policy.keys_from` decides whose keys count, with
a restricted project; a run whose borg excluded part of the server keeps nothing. Against
the shared private Incus and a real repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cli import borg, incus_config, one_line_error, run_cli
from harness.server import BTRFS_POOL, SECOND_PROJECT, IncusServer

pytestmark = pytest.mark.incus

K = "user.incus-borg."
EVIL = "tn-evil"
TENANT = "tenant"  # a restricted project with profiles of its own
VICTIMS = {("default", "tn-a"): "default", (SECOND_PROJECT, "tn-b"): BTRFS_POOL}
DATA = {"/root/data": (b"precious\n", 0, 0, 0o600)}
ROOTFS = "instances/{}/{}/backup/container/rootfs"
# What every run must hold, besides the other instances' data.
SERVER_STATE = ("manifest.json", "database", "dumps/global.sql", "host/subuid", "host/subgid")


@dataclass
class Env:
    server: IncusServer
    root: Path
    config: Path

    def put(self, key: str, value: str, name: str = EVIL, project: str = "default") -> None:
        self.server.daemon.incus("config", "set", name, K + key, value, "--project", project)

    def unset(self, key: str, name: str = EVIL, project: str = "default") -> None:
        self.server.daemon.incus("config", "unset", name, K + key, "--project", project)

    def backup(self, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli("backup", "--json", config=config or self.config)

    def paths(self, run: str) -> set[str]:
        return set(borg("list", "--short", f"{self.root / 'repo'}::{run}").stdout.splitlines())

    def runs(self) -> list[str]:
        listed = json.loads(borg("list", "--json", str(self.root / "repo")).stdout)
        return [a["name"] for a in listed["archives"]]

    def config_with(self, **extra: object) -> Path:
        data = yaml.safe_load(self.config.read_text())
        data.update(extra)
        path = self.root / f"config-{len(list(self.root.glob('config-*')))}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path


@pytest.fixture(scope="module")
def env(incus_server: IncusServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("tenant")
    incus = incus_server.daemon.incus
    try:
        for (project, name), pool in VICTIMS.items():
            incus_server.launch(name, pool=pool, project=project, files=DATA)
        incus_server.launch(EVIL, files=DATA)
        incus("project", "create", TENANT, "-c", "features.profiles=true", "-c",
              "features.images=false", "-c", "restricted=true")  # fmt: skip
        incus("profile", "device", "add", "default", "root", "disk", "path=/", "pool=default",
              "--project", TENANT)  # fmt: skip
        incus_server.launch("tn-t1", project=TENANT, files=DATA)
        incus("profile", "create", "tn-prof")
        incus("profile", "set", "tn-prof", K + "exclude", "/etc/*")
        incus_server.launch("tn-d", files=DATA)
        incus("profile", "add", "tn-d", "tn-prof")
        selection = [f"{p}/{n}" for p, n in VICTIMS] + [f"default/{EVIL}"]
        config = incus_config(incus_server, root, instances=selection)
        assert run_cli("init", config=config).returncode == 0
        yield Env(incus_server, root, config)
    finally:
        for project, name in [*VICTIMS, ("default", EVIL), ("default", "tn-d")]:
            incus("delete", "--force", name, "--project", project, check=False)
        incus("delete", "--force", "tn-t1", "--project", TENANT, check=False)
        incus("profile", "delete", "tn-prof", check=False)
        incus("project", "delete", TENANT, check=False)


def assert_everything_else_archived(env: Env, done: subprocess.CompletedProcess[str]) -> str:
    """The run went through and holds the other instances' data and the server's state."""
    assert done.returncode in (0, 1), done.stderr
    run = str(json.loads(done.stdout)["run"])
    paths = env.paths(run)
    for project, name in VICTIMS:
        assert f"{ROOTFS.format(project, name)}/root/data" in paths, (name, sorted(paths)[:20])
    for path in SERVER_STATE:
        assert path in paths, path
    assert any(p.startswith("database/") for p in paths)
    return run


# --- hostile exclude patterns -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "refusal"),
    [
        ("../../../../../*", "has a '..' component"),
        ("sh:../../**", "has a '..' component"),
        ("pp:../..", "has a '..' component"),
        ("re:^/x|.*", None),
        ("re:(?s).*", None),
    ],
)
def test_a_hostile_exclude_never_reaches_beyond_its_instance(
    env: Env, pattern: str, refusal: str | None
) -> None:
    env.put("exclude", pattern)
    try:
        done = env.backup()
    finally:
        env.unset("exclude")
    if refusal is not None:
        line = one_line_error(done)
        assert f"instance default/{EVIL}: {K}exclude pattern" in line
        assert "(set on the instance)" in line and refusal in line
        return
    run = assert_everything_else_archived(env, done)
    evil_root = ROOTFS.format("default", EVIL)
    paths = env.paths(run)
    assert evil_root in paths  # the root itself stays, its content is its own business
    assert f"{evil_root}/root/data" not in paths
    assert f"instances/default/{EVIL}/backup/container/backup.yaml" in paths


# --- other hostile values -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "refusal"),
    [
        ("pre", "true\necho injected", "a control character (U+000A)"),
        ("post", "echo \u202eevil", "the invisible character RIGHT-TO-LEFT OVERRIDE (U+202E)"),
        ("exclude", "/x" * 5000, "is 10000 characters long, more than 4096"),
        ("mode", "freeze; rm -rf /", "is not one of auto, snapshot, freeze"),
        ("timeout", "\u0663", "is not a whole number of seconds"),
    ],
)
def test_a_hostile_value_is_refused_in_one_line(
    env: Env, key: str, value: str, refusal: str
) -> None:
    env.put(key, value)
    try:
        line = one_line_error(env.backup())
    finally:
        env.unset(key)
    assert line.count("\n") == 0 and "\u202e" not in line
    assert f"instance default/{EVIL}: {K}{key}" in line and refusal in line, line


def test_a_nul_never_reaches_a_command(env: Env) -> None:
    """Incus keeps a value only up to a NUL: what incus-borg gets is the part before it."""
    env.server.daemon.query(
        f"/1.0/instances/{EVIL}", "PATCH", {"config": {K + "pre": "true\u0000; touch /x"}}
    )
    try:
        done = env.backup()
    finally:
        env.unset("pre")
    assert_everything_else_archived(env, done)
    assert "pre command ran" in done.stderr
    assert env.server.exec(EVIL, "ls", "/x", check=False).returncode != 0


def test_commands_run_inside_the_instance_only_and_a_timeout_is_clamped(env: Env) -> None:
    marker = Path(f"/tmp/tn-host-marker-{os.getpid()}")
    command = f"touch {marker}; hostname > /root/where; echo $(touch {marker}2) >> /root/where"
    env.put("pre", command)
    env.put("post", f"touch {marker}3; echo post >> /root/where")
    env.put("timeout", "999999999")
    config = env.config_with(policy={"max_timeout": 120})
    try:
        done = env.backup(config)
    finally:
        for key in ("pre", "post", "timeout"):
            env.unset(key)
    run = assert_everything_else_archived(env, done)
    assert f"{K}timeout='999999999' (set on the instance) is more than policy.max_timeout: " \
           "clamped to 120 s" in done.stderr  # fmt: skip
    recorded = json.loads(run_cli("list", run, "--json", config=config).stdout)
    (evil,) = [i for i in recorded["instances"] if i["name"] == EVIL]
    assert (evil["timeout"], evil["pre_exit"], evil["post_exit"]) == (120, 0, 0)
    assert not list(marker.parent.glob(marker.name + "*"))  # nothing ran on the host
    where = env.server.exec(EVIL, "cat", "/root/where").stdout.split()
    assert where[0] == EVIL and where[-1] == "post"
    inside = env.server.exec(EVIL, "ls", f"{marker}", f"{marker}2", f"{marker}3").stdout
    assert inside.count(str(marker)) == 3


# --- whose keys count --------------------------------------------------------------------------


def plan_lines(env: Env, keys_from: str) -> str:
    config = env.config_with(
        policy={"keys_from": keys_from}, instances=[f"{TENANT}/tn-t1", "default/tn-d"]
    )
    done = run_cli("backup", "--dry-run", config=config)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def tenant_keys(env: Env) -> Iterator[None]:
    """tn-t1 (restricted project) and tn-d (default project) each carry a key of their own
    and inherit one from a profile of their project."""
    incus = env.server.daemon.incus
    env.put("mode", "stop", "tn-t1", TENANT)
    incus("profile", "set", "default", K + "exclude", "/root/*", "--project", TENANT)
    env.put("mode", "none", "tn-d")
    yield
    env.unset("mode", "tn-t1", TENANT)
    incus("profile", "unset", "default", K + "exclude", "--project", TENANT)
    env.unset("mode", "tn-d")


@pytest.mark.usefixtures("tenant_keys")
def test_keys_from_everywhere_honours_every_key(env: Env) -> None:
    out = plan_lines(env, "everywhere")
    assert f"instance {TENANT}/tn-t1 on default (dir): stop (mode from instance)" in out
    assert "instance default/tn-d on default (dir): none (mode from instance)" in out
    assert "  exclude: /root/*" in out and "  exclude: /etc/*" in out
    assert "is ignored" not in out


@pytest.mark.usefixtures("tenant_keys")
def test_keys_from_profiles_ignores_instance_keys(env: Env) -> None:
    out = plan_lines(env, "profiles")
    assert f"instance {TENANT}/tn-t1 on default (dir): freeze (mode from configuration)" in out
    assert "instance default/tn-d on default (dir): freeze (mode from configuration)" in out
    assert "  exclude: /root/*" in out and "  exclude: /etc/*" in out
    for ref in (f"{TENANT}/tn-t1", "default/tn-d"):
        assert (
            f"instance {ref}: {K}mode (set on the instance) is ignored: policy.keys_from is "
            "profiles" in out
        )


@pytest.mark.usefixtures("tenant_keys")
def test_keys_from_unrestricted_projects_ignores_the_restricted_project(env: Env) -> None:
    out = plan_lines(env, "unrestricted-projects")
    assert f"instance {TENANT}/tn-t1 on default (dir): freeze (mode from configuration)" in out
    assert "instance default/tn-d on default (dir): none (mode from instance)" in out
    assert "  exclude: /root/*" not in out and "  exclude: /etc/*" in out
    why = f"policy.keys_from is unrestricted-projects and project {TENANT} is restricted"
    assert f"instance {TENANT}/tn-t1: {K}mode (set on the instance) is ignored: {why}" in out
    assert f"instance {TENANT}/tn-t1: {K}exclude (set on the profile default) is ignored" in out


def test_a_restricted_tenant_cannot_stop_the_run_when_its_keys_do_not_count(env: Env) -> None:
    env.put("mode", "bogus", "tn-t1", TENANT)
    selection = [*[f"{p}/{n}" for p, n in VICTIMS], f"{TENANT}/tn-t1"]
    try:
        everywhere = env.config_with(instances=selection)
        assert f"instance {TENANT}/tn-t1: {K}mode='bogus'" in one_line_error(env.backup(everywhere))
        guarded = env.config_with(
            instances=selection, policy={"keys_from": "unrestricted-projects"}
        )
        done = env.backup(guarded)
    finally:
        env.unset("mode", "tn-t1", TENANT)
    run = assert_everything_else_archived(env, done)
    assert f"{ROOTFS.format(TENANT, 'tn-t1')}/root/data" in env.paths(run)


# --- a run that would miss part of the server keeps nothing ---------------------------------

# Stands in for a confinement that failed: every instance's patterns become `ESCAPE`.
ESCAPING = """
import sys
from incus_borg.backup import patterns
patterns.rooted = lambda pattern, root: {escape!r}
from incus_borg.cli import main
sys.argv[0] = "incus-borg"
main()
"""


@pytest.mark.parametrize(
    "escape",
    ["pp:database", "pf:manifest.json", "pf:" + ROOTFS.format("default", "tn-a")],
)
def test_a_run_that_excludes_part_of_the_server_fails_and_keeps_nothing(
    env: Env, escape: str
) -> None:
    env.put("exclude", "/tmp/*")
    before = env.runs()
    try:
        argv = [sys.executable, "-c", ESCAPING.format(escape=escape), "-c", str(env.config)]
        done = subprocess.run(
            [*argv, "backup"], capture_output=True, text=True, timeout=600, check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("BORG_")},
        )  # fmt: skip
    finally:
        env.unset("exclude")
    line = one_line_error(done)
    missed = escape.split(":", 1)[1]
    assert f"the run would miss {missed}" in line and "nothing was kept" in line, line
    assert env.runs() == before
    states = {name: env.server.state(name, project) for project, name in VICTIMS}
    assert set(states.values()) == {"Running"}
    assert_everything_else_archived(env, env.backup())  # and the next run is whole
