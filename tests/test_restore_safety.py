"""Restores never leave the admin stuck: kills, signals, paused instances, same-named
instances, and files that exist already. Each test runs the real command line against a
private incusd of its own and a real repository.

Kill matrix (the restore part). Each phase is held open deterministically, never by sleeping:
a wrapper around `incus import` or around incus.stop_command/start_command blocks on a FIFO
at that moment, or incus-borg stops itself at a pause point (INCUS_BORG_TEST_PAUSE_AT). Then incus-borg
gets `kill -9`, and so do its orphaned children, as a service manager's stop would do. Then
the next command runs. After it: no instance stopped or frozen that was running, no
half-registered instance, no leftover mount or borg, the daemon up, the original data intact.

Phases of `restore instance` (journal: `instance@P@NAME.json` written before the import):

| phase at the kill, and how it is held                           | next command          | outcome (measured)                                   |
|-----------------------------------------------------------------|-----------------------|------------------------------------------------------|
| recorded, `incus import` not started (import wrapper held)      | the same restore      | exit 0: nothing was made; restored                   |
| `incus import` under way: held, released after the kill, so the orphaned import makes `NAME-restoring-X` | the same restore | exit 1: warns, deletes `NAME-restoring-X`; restored |
| extracting into the new instance (paused once its borgs run)    | the same restore      | exit 1: warns, deletes `NAME-restoring-X`; restored  |
| streaming, `--stream` (paused: export-tar runs, no import yet)  | the same restore      | exit 0: Incus got a cut upload, made nothing; restored |
| extracting                                                      | a restore of another instance | exit 1: names the leftover and `incus delete --project P NAME-restoring-X`, deletes nothing |

Phases of `restore server` (journal: `server.json`, the plan, rewritten before each stage):

| phase at the kill, and how it is held                           | stage       | next commands                          | outcome (measured)                               |
|-----------------------------------------------------------------|-------------|----------------------------------------|--------------------------------------------------|
| instances stopped, daemon up (stop_command held before)         | stopping    | the same restore; the command it names | exit 2, directory named untouched; `--roll-back`: instances started again |
| daemon down, directory in place (stop_command held after)       | stopping    | the same restore; the command it names | exit 2; `--roll-back`: daemon and instances started again |
| original moved aside, about to extract the run (paused)        | extracting  | the same restore; the command it names | exit 2 naming `incus.incus-borg-old-*`; `--roll-back`: work dir removed, original back, all up |
| putting volumes back, btrfs pool loop-mounted (paused before f1) | pools | the same restore; the command it names | exit 2 naming the original; `--roll-back`: unmounted, half-restored dir kept aside, original back, all up |
| restored directory, daemon down (start_command held before)     | starting    | the same restore; the command it names | exit 2 naming the original; `--roll-back`: as above |
| daemon up on the restored directory (start_command held after)  | starting    | the same restore; the command it names | exit 2 naming the original; `--roll-back`: restored daemon shut down, as above |

In every server phase, `restore instance` and `check --restore-test` refuse with the same line.

The tests print the matrix they measured (`pytest -s`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cli import incus_config, one_line_error, run_cli, write_config
from harness.incusd import PrivateIncus, children, cmdline, mounts_below, process_table, wait_for
from harness.server import BTRFS_POOL, SECOND_PROJECT, IncusServer, prepare_server
from phases import command, pause_env, wait_paused
from test_restore_server import (
    Setup,
    after_backup_changes,
    assert_same,
    populate,
    siblings,
    state,
)

from incus_borg.errors import UserError
from incus_borg.restore.files import checked_paths
from incus_borg.restore.rollback import Plan

pytestmark = pytest.mark.incus

NAME = "sf-a"
TWIN = "sf-twin"
FILES = {
    "/root/data.bin": (os.urandom(300_000), 0, 0, 0o600),
    "/home/user/mine.txt": (b"mine\n", 1000, 1000, 0o640),
}
TIMEOUT = 180  # for a phase to be reached; generous for a loaded machine

# Holds `incus import` while HOLD exists: writes its pid into HELD, then waits on FIFO.
INCUS_WRAPPER = """#!/bin/sh
if [ "$2" = import ] && [ -e {hold} ]; then
    echo $$ > {held}.tmp && mv {held}.tmp {held}
    read _ < {fifo}
fi
exec {real} "$@"
"""
# Runs a daemon command, held before or after it while HOLD says `<what>-before|after`.
DAEMON_WRAPPER = """#!/bin/sh
hold() {{
    if [ "$(cat {hold} 2>/dev/null)" = "{what}-$1" ]; then
        echo $$ > {held}.tmp && mv {held}.tmp {held}
        read _ < {fifo}
    fi
}}
hold before
{real} || exit $?
hold after
"""


@dataclass
class Holds:
    """The files through which a test holds a wrapper at one moment."""

    root: Path

    def __post_init__(self) -> None:
        self.root.mkdir(exist_ok=True)
        if not self.fifo.exists():
            os.mkfifo(self.fifo)

    @property
    def hold(self) -> Path:
        return self.root / "hold"

    @property
    def held(self) -> Path:
        return self.root / "held"

    @property
    def fifo(self) -> Path:
        return self.root / "fifo"

    def arm(self, moment: str = "yes") -> None:
        self.held.unlink(missing_ok=True)
        self.hold.write_text(moment)

    def disarm(self) -> None:
        self.hold.unlink(missing_ok=True)
        self.held.unlink(missing_ok=True)

    def holder(self) -> int | None:
        """The pid of the wrapper that is held, once one is."""
        try:
            return int(self.held.read_text())
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Let the held wrapper go on."""
        with self.fifo.open("w") as f:
            f.write("go\n")

    def script(self, template: str, **values: str) -> str:
        q = {k: shlex.quote(str(getattr(self, k))) for k in ("hold", "held", "fifo")}
        return template.format(**q, **values)


# --- processes ---------------------------------------------------------------------------------


SPAWNED: list[subprocess.Popen[str]] = []  # what a failing test may leave held


def spawn(
    config: Path, *args: str, path_first: Path | None = None, pause: str | None = None
) -> subprocess.Popen[str]:
    """Start `incus-borg -c CONFIG ARGS...` (with `path_first` first on PATH); with `pause`,
    once it stopped itself at that pause point (see phases.py)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BORG_", "INCUS_BORG"))}
    if path_first is not None:
        env["PATH"] = f"{path_first}:{env['PATH']}"
    if pause is not None:
        env = pause_env(pause, env)
    proc = subprocess.Popen(
        command(config, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    SPAWNED.append(proc)
    if pause is not None:
        wait_paused(proc, pause)
    return proc


@pytest.fixture(autouse=True)
def no_process_left() -> Iterator[None]:
    """Whatever a test ends with, the commands it started end too, with their children."""
    yield
    while SPAWNED:
        proc = SPAWNED.pop()
        if proc.poll() is None:
            kill_9(proc, children(proc.pid))


def reach(proc: subprocess.Popen[str], what: str, seen: Callable[[], Any]) -> Any:
    """Wait until `seen()` gives something true while the command still runs; return it."""
    deadline = time.monotonic() + TIMEOUT
    while not (found := seen()):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command ended before {what}: {out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{what}: not reached within {TIMEOUT} s")
        time.sleep(0.005)
    return found


def running(pid: int) -> bool:
    proc = process_table().get(pid)
    return proc is not None and proc.state not in "ZX"


def kill_9(proc: subprocess.Popen[str], orphans: list[int]) -> None:
    """`kill -9` incus-borg, then its children (stopped first, so that they do no more)."""
    for pid in orphans:  # so that they do no more (gone already: nothing to stop)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    proc.kill()
    proc.communicate(timeout=60)
    for pid in orphans:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not any(running(pid) for pid in orphans), 30)


def child_running(pid: int, *words: str) -> list[int]:
    """Children of `pid` whose arguments hold every one of `words` (as a substring)."""
    return [c for c in children(pid) if all(any(w in a for a in cmdline(c)) for w in words)]


def borgs_of(repo: Path) -> list[int]:
    """Live processes working on the repository."""
    return [
        pid for pid in process_table() if running(pid) and any(str(repo) in a for a in cmdline(pid))
    ]


def wait_no_operations(daemon: PrivateIncus) -> None:
    """Wait until the daemon runs no operation (an orphaned import finishes server-side)."""

    def idle() -> bool:
        ops = daemon.query("/1.0/operations?recursion=1&all-projects=true") or {}
        return not [op for kind in ops.values() for op in kind if op["status"] == "Running"]

    assert wait_for(idle, 120, interval=0.2)


def record(command: str, phase: str, next_command: str, outcome: str) -> None:
    """Print one row of the kill matrix (shown with `pytest -s`)."""
    print(f"\n| {command} | {phase} | {next_command} | {outcome} |")


# --- one private server for the instance and files tests ---------------------------------------


@dataclass
class Env:
    """A private server holding sf-a and two sf-twin, its config, and the backup's content."""

    server: IncusServer
    root: Path
    config: Path
    sums: dict[str, str]
    holds: Holds
    mounts: list[str]  # below the daemon's directory, as the daemon keeps them

    @property
    def daemon(self) -> PrivateIncus:
        return self.server.daemon

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def journal(self) -> Path:
        return self.root / "staging.restore-journal"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, config=self.config)

    def instances(self) -> list[tuple[str, str, str]]:
        everywhere = "/1.0/instances?recursion=1&all-projects=true"
        return sorted((i["project"], i["name"], i["status"]) for i in self.daemon.query(everywhere))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("safety")
    daemon = PrivateIncus()
    try:
        daemon.start()
        yield fill(prepare_server(daemon), root)
    finally:
        left = daemon.shutdown()
    assert not left, left


def fill(server: IncusServer, root: Path) -> Env:
    """sf-a running; sf-twin running in `default` and stopped in `second`; one backup."""
    server.launch(NAME, files=FILES)
    server.launch(TWIN, files={"/root/which": (b"default\n", 0, 0, 0o644)})
    files = {"/root/which": (b"second\n", 0, 0, 0o644)}
    server.launch(TWIN, project=SECOND_PROJECT, files=files, start=False)
    config = incus_config(server, root)
    for args in (["init"], ["backup"]):
        done = run_cli(*args, config=config)
        assert done.returncode == 0, done.stderr
    mounts = mounts_below(server.daemon.root)
    env = Env(server, root, config, server.checksums(NAME), Holds(root / "holds"), mounts)
    env.bin.mkdir()
    real = shutil.which("incus")
    assert real is not None
    wrapper = env.bin / "incus"
    wrapper.write_text(env.holds.script(INCUS_WRAPPER, real=shlex.quote(real)))
    wrapper.chmod(0o755)
    return env


def assert_clean(env: Env, before: list[tuple[str, str, str]]) -> None:
    """No half-registered instance, journal entry, borg or mount left; the rest as before."""
    now = env.instances()
    assert not [i for i in now if "-restoring-" in i[1]], now
    assert [i for i in now if i[1] in (NAME, TWIN)] == [i for i in before if i[1] in (NAME, TWIN)]
    assert not list(env.journal.glob("*.json"))
    assert not borgs_of(env.root / "repo")
    assert mounts_below(env.daemon.root) == env.mounts
    assert not mounts_below(env.root)


def assert_restored(env: Env, name: str) -> None:
    """`name` runs with the archived content of sf-a; then it is deleted again."""
    assert env.server.wait_state(name, "Running", timeout=30)
    assert env.server.checksums(name) == env.sums
    assert env.server.owner(name, "/home/user/mine.txt") == (1000, 1000)
    if name != NAME:
        env.server.delete(name)


# --- item 8: check --restore-test with same-named instances in two projects -------------------


def test_restore_test_with_same_named_instances_in_two_projects(env: Env) -> None:
    done = env.cli("check", "--restore-test")
    assert done.returncode == 0, done.stderr
    for project in ("default", SECOND_PROJECT):
        assert f"restore test: instance {project}/{TWIN}: every file identical" in done.stdout
    assert "3 instance(s) identical" in done.stdout
    projects = env.daemon.query("/1.0/projects")
    assert not [p for p in projects if "incus-borg-check" in p], projects


# --- item 11: restore files --------------------------------------------------------------------


def test_files_to_an_existing_file_is_refused(env: Env, tmp_path: Path) -> None:
    target = tmp_path / "a-file"
    target.write_text("mine\n")
    error = one_line_error(
        env.cli("restore", "files", "latest", NAME, "/root", "--to", str(target))
    )
    assert f"--to {target} exists and is not a directory" in error
    assert target.read_text() == "mine\n"


def test_files_under_the_destination_are_never_replaced_silently(env: Env, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    args = ("restore", "files", "latest", NAME, "/root/data.bin", "/home/user", "--to", str(dest))
    assert env.cli(*args).returncode == 0
    (dest / "root/data.bin").write_bytes(b"changed")
    (dest / "home/user/mine.txt").unlink()

    error = one_line_error(env.cli(*args))
    assert f"root/data.bin exist under {dest}: add --overwrite" in error
    assert (dest / "root/data.bin").read_bytes() == b"changed"
    assert not (dest / "home/user/mine.txt").exists()  # nothing was written
    assert sorted(p.name for p in dest.iterdir()) == ["home", "root"]  # no temporary left

    done = env.cli(*args, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert (dest / "root/data.bin").read_bytes() == FILES["/root/data.bin"][0]
    mine = dest / "home/user/mine.txt"
    assert mine.read_bytes() == b"mine\n"
    assert (mine.stat().st_uid, mine.stat().st_mode & 0o777) == (1000, 0o640)

    (dest / "home/user/mine.txt").unlink()
    (dest / "home/user/mine.txt").mkdir()  # a directory where the archive has a file
    error = one_line_error(env.cli(*args, "--overwrite"))
    assert "home/user/mine.txt under" in error and "between a directory and a file" in error


def test_refused_paths_leave_nothing_behind(env: Env, tmp_path: Path) -> None:
    dest = tmp_path / "new" / "deeper"
    for bad in ("../etc", "/root/../../etc", "//..//x"):
        error = one_line_error(
            env.cli("restore", "files", "latest", NAME, "/root/data.bin", bad, "--to", str(dest))
        )
        assert f"{bad}: a PATH may not contain '..'" in error, error
        assert not (tmp_path / "new").exists()
    error = one_line_error(
        env.cli("restore", "files", "latest", NAME, "/root/data.bin", "/no/such", "--to", str(dest))
    )
    assert f"/no/such: not in default/{NAME}" in error
    assert not (tmp_path / "new").exists()


# --- item 12, restore instance: signals and kills ------------------------------------------------


@pytest.mark.parametrize(
    ("phase", "sig"),
    [("importing the definition", signal.SIGHUP), ("streaming", signal.SIGTERM)],
)
def test_signal_in_a_phase_of_restore_instance_undoes_it(
    env: Env, phase: str, sig: signal.Signals
) -> None:
    """SIGHUP while the definition is imported, SIGTERM while the data streams into `incus
    import`: interrupted, and nothing is left (extraction: tests/test_restore.py)."""
    before = env.instances()
    args = ["restore", "instance", "latest", NAME, "--as", "sf-sig"]
    env.holds.arm()  # `incus import` held: in the streamed phase, once borg export-tar runs
    stream = ["--stream"] if phase == "streaming" else []
    proc = spawn(env.config, *args, *stream, path_first=env.bin)
    reach(proc, phase, env.holds.holder)
    assert [p.name for p in env.journal.iterdir()] == ["instance@default@sf-sig.json"]
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    env.holds.disarm()
    assert proc.returncode == 2 and "interrupted" in stderr, stderr
    wait_no_operations(env.daemon)
    assert_clean(env, before)
    assert not [i for i in env.instances() if i[1] == "sf-sig"]


def test_kill_during_restore_instance_then_the_same_restore(env: Env) -> None:
    before = env.instances()
    for phase in ("import-not-started", "import-finished-after-kill", "extracting", "streaming"):
        name = "sf-k"
        if phase == "extracting":  # the original name: it is deleted, then restored
            name = NAME
            env.server.delete(NAME)
        leftover = _kill_restore_instance(env, phase, name)
        args = ["restore", "instance", "latest", NAME, "--start"]
        args += ["--stream"] if phase == "streaming" else []
        args += ["--as", name] if name != NAME else []
        done = env.cli(*args)
        expected = 1 if leftover else 0
        assert done.returncode == expected, (phase, done.stdout, done.stderr)
        if leftover:
            assert f"instance default/{leftover} was half-restored as default/{name}" in done.stderr
            assert "deleting it" in done.stderr
        assert_restored(env, name)
        assert_clean(env, before)
        outcome = f"exit {done.returncode}" + (f": deleted {leftover}" if leftover else "")
        record("restore instance", phase, "the same restore", outcome + ", restored, clean")


def _kill_restore_instance(env: Env, phase: str, name: str) -> str | None:
    """kill -9 a `restore instance latest sf-a` into `name` in `phase`; the half-restored
    instance it left (None when it left none)."""
    args = ["restore", "instance", "latest", NAME] + (["--as", name] if name != NAME else [])
    args += ["--stream"] if phase == "streaming" else []
    if phase.startswith("import"):
        env.holds.arm()
    pause = {"extracting": "restore-extracting", "streaming": "restore-streaming"}.get(phase)
    proc = spawn(env.config, *args, path_first=env.bin, pause=pause)
    if phase.startswith("import"):
        wrapper = reach(proc, phase, env.holds.holder)
        assert list(env.journal.glob("instance@default@*.json"))  # recorded before the import
        if phase == "import-not-started":
            kill_9(proc, [wrapper])
        else:
            kill_9(proc, [])
            env.holds.release()  # the orphaned `incus import` goes on: Incus makes the instance
            assert wait_for(lambda: not running(wrapper), 60)
    elif phase == "extracting":
        kill_9(proc, child_running(proc.pid, "borg"))
    else:
        kill_9(proc, child_running(proc.pid, "export-tar"))
    env.holds.disarm()
    wait_no_operations(env.daemon)
    left = [i[1] for i in env.instances() if i[1].startswith(f"{name}-restoring-")]
    assert len(left) <= 1
    return left[0] if left else None


def test_a_leftover_is_named_by_other_restores_and_deleted_by_its_own(env: Env) -> None:
    before = env.instances()
    leftover = _kill_restore_instance(env, "extracting", "sf-k")
    assert leftover is not None
    done = env.cli("restore", "instance", "latest", f"default/{TWIN}", "--as", "sf-other")
    assert done.returncode == 1, done.stderr
    assert f"`incus delete --project default {leftover}`" in done.stderr
    assert leftover in [i[1] for i in env.instances()]  # not ours to delete here
    env.server.delete("sf-other")
    record(
        "restore instance",
        "extracting",
        "a restore of another instance",
        "exit 1: names the leftover and `incus delete --project default NAME-restoring-X`",
    )

    done = env.cli("restore", "instance", "latest", NAME, "--as", "sf-k", "--start")
    assert done.returncode == 1, done.stderr
    assert_restored(env, "sf-k")
    assert_clean(env, before)


# --- the pure parts: what a killed server restore left, which PATHs a files restore takes --------


def test_the_plan_tells_what_lies_at_the_incus_directory(tmp_path: Path) -> None:
    """Whether the Incus directory holds the restore or the original, at each stage."""
    plan = Plan("run", str(tmp_path / "incus"), "20250101-000000", had_original=True)
    assert not plan.restored_in_place()  # stopping: nothing moved yet
    plan.stage = "moving"
    assert not plan.restored_in_place()  # killed before the rename: the original is in place
    plan.old.mkdir()
    assert plan.restored_in_place()  # renamed: whatever is at the directory is the restore's
    plan.had_original = False
    plan.old.rmdir()
    assert plan.restored_in_place()  # there was none: anything there is the restore's


def test_paths_that_lead_out_are_refused_before_anything() -> None:
    assert checked_paths(("/etc/x", "home//user/", "./a/./b", "/")) == [
        "etc/x",
        "home/user",
        "a/b",
        "",
    ]
    for bad in ("..", "a/../../b", "/../etc", "//..//x"):
        with pytest.raises(UserError, match=re.escape("may not contain '..'")):
            checked_paths((bad,))


# --- restore server: paused instances and kills --------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """A private server (d1, f1 on btrfs with a snapshot, p1 in `second`, a volume), backed up
    once, with its daemon commands behind wrappers that a test can hold."""
    root = tmp_path_factory.mktemp("safety-server")
    daemon = PrivateIncus()
    try:
        daemon.start()
        server = prepare_server(daemon)
        populate(server, full=False)
        the_setup = Setup(server, root, incus_config(server, root))
        wrap_daemon_commands(the_setup, Holds(root / "holds"))
        for args in (["init"], ["backup"]):
            done = run_cli(*args, config=the_setup.config)
            assert done.returncode == 0, done.stderr
        yield the_setup
    finally:
        left = daemon.shutdown()
    assert not left, left


def wrap_daemon_commands(setup: Setup, holds: Holds) -> None:
    data = yaml.safe_load(setup.config.read_text())
    for what in ("stop", "start"):
        wrapper = setup.root / f"{what}-wrapper"
        real = getattr(setup.daemon, f"{what}_command")()
        wrapper.write_text(holds.script(DAEMON_WRAPPER, what=what, real=real))
        wrapper.chmod(0o755)
        data["incus"][f"{what}_command"] = str(wrapper)
    write_config(setup.config, data)


def test_paused_instance_is_refused_up_front(setup: Setup) -> None:
    before = state(setup)
    setup.daemon.incus("pause", "d1")
    try:
        started = time.monotonic()
        error = one_line_error(run_cli("restore", "server", "latest", "--yes", config=setup.config))
        assert time.monotonic() - started < 30  # no stop timeout waited for
        assert "instance(s) default/d1 are paused" in error
        assert "`incus start --project P NAME`" in error
        assert setup.server.state("d1") == "Frozen"
        assert siblings(setup) == []
        assert not (setup.root / "staging.restore-journal" / "server.json").exists()
    finally:
        setup.daemon.incus("start", "d1")  # the fix the message names: resume
    assert setup.server.wait_state("d1", "Running")
    assert_same(state(setup), before)


SERVER_PHASES = [
    # (hold, the journal's stage at the kill, phase)
    ("stop-before", "stopping", "stopping: instances stopped, daemon up"),
    ("stop-after", "stopping", "stopping: daemon down, directory in place"),
    ("borg-run", "extracting", "extracting the directory (original moved aside)"),
    ("borg-part", "pools", "putting volumes back, btrfs pool loop-mounted"),
    ("start-before", "starting", "starting: restored directory, daemon down"),
    ("start-after", "starting", "starting: daemon up on the restored directory"),
]


def test_kill_during_restore_server_then_the_named_roll_back(setup: Setup) -> None:
    before = after_backup_changes(setup)
    mounts = sorted(mounts_below(setup.daemon.root))
    holds = Holds(setup.root / "holds")
    for hold, stage, phase in SERVER_PHASES:
        seen = _kill_restore_server(setup, holds, hold)
        assert seen == stage, (phase, seen)
        outcome = _next_commands(setup, before)
        assert sorted(mounts_below(setup.daemon.root)) == mounts, phase
        assert not borgs_of(setup.root / "repo")
        record(
            "restore server",
            f"{phase} (stage {stage})",
            "the same restore, then the command it names",
            outcome,
        )
    done = run_cli("restore", "server", "latest", "--yes", config=setup.config)
    assert done.returncode == 0, done.stderr  # nothing left in the way
    assert not (setup.root / "staging.restore-journal" / "server.json").exists()


def _kill_restore_server(setup: Setup, holds: Holds, hold: str) -> str:
    """kill -9 `restore server latest` at the held moment; the journal's stage then."""
    journal = setup.root / "staging.restore-journal" / "server.json"
    if not hold.startswith("borg"):
        holds.arm(hold)
    pause = {"borg-run": "server-extracting", "borg-part": "server-pools:default/f1"}.get(hold)
    proc = spawn(setup.config, "restore", "server", "latest", "--yes", pause=pause)
    if pause is not None:
        stage = json.loads(journal.read_text())["stage"]
        if hold == "borg-part":
            assert mounts_below(setup.pool_path(BTRFS_POOL))  # the loop pool is mounted
        kill_9(proc, [])
    else:
        wrapper = reach(proc, hold, holds.holder)
        stage = json.loads(journal.read_text())["stage"]
        if hold == "stop-before":
            assert setup.daemon.running()
        kill_9(proc, [wrapper])
    holds.disarm()
    return str(stage)


def _next_commands(setup: Setup, before: dict[str, Any]) -> str:
    """The same restore (refused, naming the original directory and a command), then that
    command; checks everything is as before, and says what happened."""
    listed = siblings(setup)
    error = one_line_error(run_cli("restore", "server", "latest", "--yes", config=setup.config))
    for other in (
        ["restore", "instance", "latest", "d1", "--as", "x"],
        ["check", "--restore-test"],
    ):
        assert one_line_error(run_cli(*other, config=setup.config)) == error  # they notice too
    assert siblings(setup) == listed  # the refusals changed nothing
    old = [s for s in listed if ".incus-borg-old-" in s]
    if old:
        assert f"the original Incus directory is {setup.daemon.root / old[0]}" in error, error
    else:
        assert "was not moved" in error or "no Incus directory before" in error, error
    command = re.search(r"put it back with `incus-borg ([^`]*)`", error)
    assert command is not None, error
    argv = shlex.split(command.group(1))
    assert argv[:2] == ["-c", str(setup.config)]
    done = run_cli(*argv[2:], config=setup.config)
    assert done.returncode == 0, (done.stdout, done.stderr)
    setup.daemon.wait_ready()
    assert_same(state(setup), before)
    assert setup.server.state("changed") == "Stopped"
    assert (setup.root / "subuid").read_text() == "root:2000000:65536\n"
    failed = [s for s in siblings(setup) if ".incus-borg-failed-" in s]
    assert [s for s in siblings(setup) if s not in failed] == []
    for name in failed:  # the half-restored tree: nothing mounted below it, ours to remove
        assert not mounts_below(setup.daemon.root / name)
        shutil.rmtree(setup.daemon.root / name)
    named = "the original" if old else "the untouched directory"
    return f"exit 2 naming {named} and `--roll-back`; rolled back" + (
        ", half-restored directory kept aside" if failed else ""
    )
