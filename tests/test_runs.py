"""What a run is, end to end: partial runs, `latest`, `list`, `prune` of complete, partial and
incomplete runs, and config values refused before anything is quiesced.

Against the private daemon and a real repository. The module makes a complete run, then a
partial one (`backup --instance rn-b`), both without stopping the daemon (quiesce_daemon:
false), so that a `restore server` that got past its partial-run check would stop at the
dumps-only check instead of replacing the shared server.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli import borg, borg_env, incus_config, one_line_error, run_cli, write_config
from harness.server import IncusServer

from incus_borg import layout
from incus_borg.runs.catalogue import Catalogue

pytestmark = pytest.mark.incus

RETENTION = {"keep_daily": 1, "keep_weekly": 0, "keep_monthly": 0}
OURS = ("rn-a", "rn-b")


@dataclass
class Env:
    """The server, a configuration, its repository, the complete run and the partial run."""

    server: IncusServer
    root: Path
    config: Path
    complete: str  # `backup`
    partial: str  # then `backup --instance rn-b`

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    def cli(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, config=config or self.config)

    def backup(self, *args: str) -> str:
        done = self.cli("backup", "--json", *args)
        assert done.returncode in (0, 1), done.stderr
        return str(json.loads(done.stdout)["run"])

    def listing(self) -> list[dict[str, Any]]:
        done = self.cli("list", "--json")
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout)["local"])

    def states(self) -> dict[str, str]:
        return {name: self.server.state(name) for name in OURS}

    def archives(self) -> list[str]:
        return borg("list", "--consider-checkpoints", "--short", str(self.repo)).stdout.split()

    def assert_untouched(self, archives: list[str]) -> None:
        """Nothing was quiesced, journalled or archived."""
        assert self.states() == {"rn-a": "Running", "rn-b": "Running"}
        assert not (self.root / "staging.journal").exists()
        staging = self.root / "staging"
        assert not staging.exists() or [p.name for p in staging.iterdir()] == [
            ".incus-borg-staging"
        ]
        assert self.archives() == archives


@pytest.fixture(scope="module")
def env(incus_server: IncusServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    server = incus_server
    root = tmp_path_factory.mktemp("runs")
    server.launch("rn-a", files={"/root/v": (b"a-1\n", 0, 0, 0o644)})
    server.launch("rn-b", files={"/root/v": (b"b-1\n", 0, 0, 0o644)})
    config = incus_config(server, root, quiesce_daemon=False, retention=RETENTION)
    assert run_cli("init", config=config).returncode == 0
    env = Env(server, root, config, "", "")
    env.complete = env.backup()
    server.push_file("rn-b", "/root/v", b"b-2\n")
    env.partial = env.backup("--instance", "rn-b")
    try:
        yield env
    finally:
        for name in OURS:
            server.delete(name)


def test_runs_are_listed_with_their_state(env: Env) -> None:
    entries = {e["name"]: e for e in env.listing()}
    assert entries[env.complete]["state"] == "complete"
    assert entries[env.partial]["state"] == "partial"
    table = env.cli("list").stdout
    assert f"{env.complete}  complete" in table and f"{env.partial}  partial" in table
    comments = borg("list", "--format", "{name} {comment}{NL}", str(env.repo)).stdout
    assert f"{env.partial} incus-borg run=partial" in comments


def test_restore_server_refuses_a_partial_run(env: Env) -> None:
    """Issue 16 item 2: a partial run restored a database whose instances had no data."""
    archives = env.archives()
    error = one_line_error(env.cli("restore", "server", env.partial, "--yes"))
    assert f"local::{env.partial} is a partial run" in error
    assert f"the newest is {env.complete}" in error
    env.assert_untouched(archives)
    assert not list(env.server.daemon.incus_dir.parent.glob("*.incus-borg-*"))


def test_restore_server_latest_is_the_newest_complete_run(env: Env) -> None:
    """It gets past the partial-run check to the complete run, which holds SQL dumps only."""
    error = one_line_error(env.cli("restore", "server", "latest", "--yes"))
    assert f"local::{env.complete} holds SQL dumps only" in error
    env.assert_untouched(env.archives())


def test_latest_for_other_restores_is_the_newest_run_holding_the_item(
    env: Env, tmp_path: Path
) -> None:
    done = env.cli("restore", "files", "latest", "rn-a", "/root/v", "--to", str(tmp_path / "a"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "a" / "root/v").read_text() == "a-1\n"  # only the complete run has it
    done = env.cli("restore", "files", "latest", "rn-b", "/root/v", "--to", str(tmp_path / "b"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "b" / "root/v").read_text() == "b-2\n"  # the partial run is newer
    shown = env.cli("list", "latest", "--json")
    assert json.loads(shown.stdout)["run"] == env.partial  # list and config: the newest run
    error = one_line_error(env.cli("restore", "instance", "latest", "rn-nosuch"))
    assert "repository local holds no instance 'rn-nosuch' in any run" in error


def test_the_plan_keeps_an_instance_s_snapshots_in_incus_s_order(env: Env) -> None:
    """The plan lists instances without their state and asks only those with snapshots for
    theirs: the order stays Incus's (oldest first), which the import index and a restore
    follow, not the names' order."""
    for snap in ("zz-first", "aa-second", "mm-third"):
        env.server.daemon.incus("snapshot", "create", "rn-a", snap)
    try:
        done = env.cli("backup", "--dry-run")
        assert done.returncode == 0, done.stderr
        line = next(s for s in done.stdout.splitlines() if s.startswith("instance default/rn-a "))
        assert "snapshots ['zz-first', 'aa-second', 'mm-third']" in line, line
        assert "instance default/rn-b " in done.stdout and "snapshots none" in done.stdout
    finally:
        for snap in ("zz-first", "aa-second", "mm-third"):
            env.server.daemon.incus("snapshot", "delete", "rn-a", snap)


def catalogue_entry(env: Env, run: str) -> Path:
    """Where this host's run catalogue keeps a run of the module's repository."""
    return Catalogue.beside(env.root / "staging").entry(str(env.repo), run)


@contextmanager
def catalogue_changed(
    env: Env, run: str, change: Callable[[dict[str, Any]], None]
) -> Iterator[None]:
    """A run's catalogue entry, changed by `change` (its files decoded), for the block."""
    entry = catalogue_entry(env, run)
    original = entry.read_text()
    data = json.loads(original)
    files = {k: base64.b64decode(v) for k, v in data["files"].items()}
    data["files"] = files
    change(data)
    data["files"] = {k: base64.b64encode(v).decode() for k, v in files.items()}
    entry.write_text(json.dumps(data))
    try:
        yield
    finally:
        entry.write_text(original)


def test_list_latest_reads_a_run_this_host_made_from_its_catalogue(env: Env) -> None:
    """Issue 26: `list latest` read the manifest and definitions out of the archive (a walk of
    its whole metadata); a run this host made needs one listing of the repository."""
    fast = env.cli("--profile", "list", "latest", "--json")
    assert fast.returncode == 0, fast.stderr
    assert "borg list" in fast.stderr and "borg extract" not in fast.stderr
    entry = catalogue_entry(env, env.partial)
    assert entry.is_file()
    aside = entry.with_name(entry.name + ".aside")
    entry.rename(aside)
    try:
        slow = env.cli("--profile", "list", "latest", "--json")
    finally:
        aside.rename(entry)
    assert slow.returncode == 0, slow.stderr
    assert "borg extract" in slow.stderr  # a host without the entry reads the archive
    assert json.loads(fast.stdout) == json.loads(slow.stdout)


def test_a_catalogue_entry_of_another_archive_is_not_used(env: Env) -> None:
    """An entry whose archive id is not the one the repository lists (an archive renamed,
    or deleted and made again, under the same name) is ignored, even where every file has
    the archive's size: the archive is read, for `latest` and for the archive named."""
    forged = ""

    def forge(data: dict[str, Any]) -> None:
        nonlocal forged
        data["id"] = "0" * 64
        text = data["files"]["manifest.json"].decode()
        hostname = json.loads(text)["hostname"]
        forged = "x" * len(hostname)  # the manifest keeps its size
        data["files"]["manifest.json"] = text.replace(f'"{hostname}"', f'"{forged}"').encode()

    with catalogue_changed(env, env.partial, forge):
        latest = env.cli("--profile", "list", "latest", "--json")
        named = env.cli("--profile", "list", env.partial, "--json")
    for done in (latest, named):
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["hostname"] != forged
        assert "borg extract" in done.stderr


def test_restore_instance_takes_the_run_s_small_files_from_the_catalogue(env: Env) -> None:
    """Issue 26: a restore of one instance read the run's files out of the archive, then
    its data: from the catalogue, only the instance's listing and its data are read."""
    done = env.cli("--profile", "restore", "instance", env.complete, "rn-a", "--as", "rn-a-cat")
    assert done.returncode == 0, done.stderr
    try:
        assert "borg extract + list" not in done.stderr  # the archive's own files: not read
        assert "borg extract (side by side)" in done.stderr  # the data
        rootfs = Path(env.server.daemon.incus_dir) / "storage-pools/default/containers/rn-a-cat"
        assert (rootfs / "rootfs/root/v").read_text() == "a-1\n"
    finally:
        env.server.delete("rn-a-cat")


def test_a_catalogued_file_unlike_the_archive_s_is_not_used(env: Env) -> None:
    """An instance's catalogued backup.yaml whose size is not the archived one's is not
    trusted: the restore reads the archive's."""
    config = "instances/default/rn-a/backup/container/backup.yaml"

    def forge(data: dict[str, Any]) -> None:
        backup = yaml.safe_load(data["files"][config])
        backup["container"]["config"]["user.forged"] = "yes"
        data["files"][config] = yaml.safe_dump(backup).encode()

    with catalogue_changed(env, env.complete, forge):
        done = env.cli("--profile", "restore", "instance", env.complete, "rn-a", "--as", "rn-a-cat")
    assert done.returncode == 0, done.stderr
    try:
        assert "borg extract + list" in done.stderr
        restored = env.server.daemon.query("/1.0/instances/rn-a-cat")
        assert "user.forged" not in restored["config"]
    finally:
        env.server.delete("rn-a-cat")


def test_a_catalogue_entry_of_an_archive_gone_from_the_repository_is_not_used(
    env: Env,
) -> None:
    """An archive named on the command line is listed before its entry is used: one that was
    deleted behind this host's back (another host's prune, `borg delete`) is refused with
    exit 2, before anything is made."""
    gone = "rn-host-2000-01-03T00:00:00"
    entry = catalogue_entry(env, gone)
    data = json.loads(catalogue_entry(env, env.complete).read_text()) | {"archive": gone}
    entry.write_text(json.dumps(data))
    try:
        for command in (
            ("list", gone),
            ("restore", "instance", gone, "rn-a", "--as", "rn-a-gone"),
        ):
            error = one_line_error(env.cli(*command))
            assert f"no archive {gone!r} in repository local" in error, (command, error)
    finally:
        entry.unlink()
    assert "rn-a-gone" not in {
        i["name"] for i in env.server.daemon.query("/1.0/instances?recursion=1")
    }


CONFIG_REFUSALS = [
    # (what the test config changes, what the one-line error says)
    (
        {"archive_name_format": "{hostname}@{now}"},
        "'archive_name_format' gives names containing '@'",
    ),
    (
        {"archive_name_format": "{foo}-{now}"},
        "'archive_name_format' has an unknown placeholder {foo}",
    ),
    ({"archive_name_format": ""}, "'archive_name_format' is empty"),
    ({"archive_name_format": "a/b-{now:%s}"}, "'archive_name_format' gives names containing '/'"),
    ({"archive_name_format": "nightly"}, "'archive_name_format' has no {now} or {utcnow}"),
    (
        {"repositories": [{"path": "repo", "label": "local"}]},
        "'repositories[0].path' is the relative",
    ),
    ({"staging_dir": "staging"}, "'staging_dir' is the relative path"),
]


@pytest.mark.parametrize(("changes", "expected"), CONFIG_REFUSALS)
def test_bad_config_values_are_refused_before_anything_is_quiesced(
    env: Env, tmp_path: Path, changes: dict[str, Any], expected: str
) -> None:
    """Issue 16 item 7: bad names failed only after the daemon stopped and instances froze."""
    data = {**yaml.safe_load(env.config.read_text()), **changes}
    config = write_config(tmp_path / "bad.yaml", data)
    archives = env.archives()
    for command in (("config", "validate"), ("backup",), ("hook", "pre")):
        error = one_line_error(env.cli(*command, config=config))
        assert f"config {config}: {expected}" in error, (command, error)
    env.assert_untouched(archives)


def test_staging_holding_the_repository_is_refused_and_kept(env: Env, tmp_path: Path) -> None:
    """Issue 16 item 1: staging_dir set to a directory holding the repository deleted it."""
    backups = tmp_path / "backups"
    data = yaml.safe_load(env.config.read_text())
    data["repositories"] = [{"path": str(backups / "incus-borg"), "label": "local"}]
    data["staging_dir"] = str(backups)
    config = write_config(tmp_path / "bad.yaml", data)
    assert run_cli("init", config=config).returncode == 0
    (backups / "notes.txt").write_text("mine\n")
    for command in (("config", "validate"), ("backup",), ("hook", "pre")):
        error = one_line_error(env.cli(*command, config=config))
        assert f"'staging_dir' {backups} contains 'repositories[0].path'" in error
    assert (backups / "notes.txt").read_text() == "mine\n"
    assert (backups / "incus-borg" / "config").is_file()
    assert not (tmp_path / "backups.journal").exists()
    assert env.states() == {"rn-a": "Running", "rn-b": "Running"}


def test_read_only_staging_is_refused(env: Env, tmp_path: Path) -> None:
    """Issue 16 item 10: a read-only staging_dir gave `unexpected OSError`."""
    mount = tmp_path / "ro"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], check=True)
    try:
        data = {**yaml.safe_load(env.config.read_text()), "staging_dir": str(mount / "staging")}
        config = write_config(tmp_path / "bad.yaml", data)
        archives = env.archives()
        for command in (("config", "validate"), ("backup",), ("hook", "pre")):
            error = one_line_error(env.cli(*command, config=config))
            assert f"'staging_dir' {mount / 'staging'}: {mount} is on a read-only" in error
        env.assert_untouched(archives)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_prune_keeps_the_complete_run_beside_a_partial_one(env: Env) -> None:
    """Issue 16 item 3: `backup; backup --instance X; prune` kept only the partial run."""
    done = env.cli("prune")
    assert done.returncode == 0, done.stderr
    assert f"keeping {env.complete} (keep_daily)" in done.stdout
    assert f"keeping {env.partial} (partial run, keep_daily)" in done.stdout
    assert "deleting" not in done.stdout
    assert {e["name"] for e in env.listing()} == {env.complete, env.partial}
    done = env.cli("restore", "instance", "latest", "rn-a", "--as", "rn-a-back")
    assert done.returncode == 0, done.stderr
    assert f"from local::{env.complete}" in done.stdout
    env.server.delete("rn-a-back")


def test_runs_of_older_versions_are_read_from_their_manifest(env: Env) -> None:
    """Older versions marked every archive `incus-borg` alone: the manifest tells the state."""
    for name in (env.complete, env.partial):
        borg("recreate", "--comment", layout.RUN_COMMENT, f"{env.repo}::{name}")
    assert {e["state"] for e in env.listing()} == {"unknown"}
    done = env.cli("prune", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert f"keeping {env.complete} (keep_daily)" in done.stdout
    assert f"keeping {env.partial} (partial run, keep_daily)" in done.stdout
    error = one_line_error(env.cli("restore", "server", "latest", "--yes"))
    assert f"local::{env.complete} holds SQL dumps only" in error


def sigint_checkpoint(env: Env, name: str, source: Path) -> None:
    """A Borg checkpoint archive, as Ctrl-C during an incus-borg run's `borg create` leaves
    it: borg saves NAME.checkpoint (without the comment) and exits."""
    binary = str(Path(sys.executable).parent / "borg")
    argv = [binary, "--log-json", "create", "--progress", "-C", "lzma,9"]
    argv += ["--comment", layout.run_comment(False), f"{env.repo}::{name}", str(source)]
    proc = subprocess.Popen(argv, env=borg_env(), stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until it is reading the file
        if '"archive_progress"' in line and json.loads(line).get("original_size"):
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert f"{name}.checkpoint" in env.archives()


def test_interrupted_runs_are_listed_incomplete_then_pruned(env: Env, tmp_path: Path) -> None:
    """Issue 16 item 9 and issue 18 item 4: what interrupted runs left was invisible and
    never pruned."""
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_text("part\n")
    big.write_bytes(os.urandom(8 << 20))  # new chunks: borg takes seconds to store them
    # A format-1 run whose first part reached the repository, and no more.
    orphan = "rn-host-2000-01-01T00:00:00@instance@default@rn-a"
    borg("create", "--comment", layout.run_comment(False), f"{env.repo}::{orphan}", str(small))
    sigint_checkpoint(env, "rn-host-2000-01-02T00:00:00", big)
    borg("create", f"{env.repo}::other-program.checkpoint", str(small))
    entries = {(e["name"], e["state"]): e for e in env.listing()}
    assert entries[("rn-host-2000-01-01T00:00:00", "incomplete")]["archives"] == [orphan]
    checkpoint = entries[("rn-host-2000-01-02T00:00:00", "incomplete")]
    assert checkpoint["archives"] == ["rn-host-2000-01-02T00:00:00.checkpoint"]
    assert not [e for e in entries if e[0].startswith("other-program")]
    assert "incomplete  (1 archive(s) of an interrupted run" in env.cli("list").stdout

    kept = env.cli("prune")  # no complete run is newer yet
    assert kept.returncode == 0, kept.stderr
    assert "keeping rn-host-2000-01-01T00:00:00 (incomplete run" in kept.stdout
    newer = env.backup()
    done = env.cli("prune")
    assert done.returncode == 0, done.stderr
    assert "deleting rn-host-2000-01-01T00:00:00 (incomplete run older than" in done.stdout
    assert f"deleting {env.partial} (partial run older than a kept complete run)" in done.stdout
    left = env.archives()
    assert orphan not in left and "rn-host-2000-01-02T00:00:00.checkpoint" not in left
    assert "other-program.checkpoint" in left  # not incus-borg's
    assert {e["name"] for e in env.listing()} == {newer}
    assert catalogue_entry(env, newer).is_file()  # prune forgets the deleted runs' entries
    assert not catalogue_entry(env, env.partial).exists()
    assert not catalogue_entry(env, env.complete).exists()


def test_prune_says_when_the_server_did_not_compact(env: Env) -> None:
    """Issue 18 item 6: `prune` said "compacted" to an append-only repository whose config
    lacks `append_only: true`."""
    borg("config", str(env.repo), "append_only", "1")
    try:
        env.backup()
        done = env.cli("prune")
        assert done.returncode == 1, done.stderr
        assert "compacted" not in done.stdout
        assert "space is reclaimed only by the server's owner" in done.stderr
    finally:
        borg("config", str(env.repo), "append_only", "0")
    env.backup()
    done = env.cli("prune")
    assert done.returncode == 0 and "repository local: compacted" in done.stdout, done.stderr
