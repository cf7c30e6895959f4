"""The only code that runs `borg`: argv builders (pure functions) and one runner.

Secrets travel in the child's environment only, never in argv or logs. Every call runs
with BORG_EXIT_CODES=modern and --log-json, so failures map to clear messages.
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
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import signals
from .config import Config, Repository
from .errors import UserError

MIN_VERSION = (1, 4)
# Connection closed / broken (ssh:// repositories): retried with a doubling delay.
CONNECTION_FAILURES = (80, 81, 87)
CONNECTION_RETRIES = 2
RETRY_DELAY = 1.0
# ssh options for every ssh connection whose command does not set ServerAlive* itself: a server
# that stops answering at the network level is dropped after about a minute.
KEEPALIVE = {"ServerAliveInterval": "10", "ServerAliveCountMax": "6"}
# Seconds between SIGTERM and SIGKILL for a borg that stalled (one waiting on a stopped server
# ignores SIGTERM: it tries to roll back through that server).
STALL_GRACE = 3.0
PASSPHRASE_ENV = ("BORG_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_PASSPHRASE_FD")


def find_borg() -> str:
    """The borg next to the running interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "borg"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("borg")
    if found is None:
        raise UserError("borg is not installed: pip install 'borgbackup>=1.4,<2'")
    return found


def checked_version(binary: str) -> str:
    """The version of `binary`, refusing anything older than borg 1.4."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(f"cannot run {binary} --version: {exc}") from None
    match = re.search(r"(\d+)\.(\d+)\.\S+", out)
    if match is None:
        raise UserError(f"cannot tell the version of {binary} from {out.strip()!r}")
    if (int(match.group(1)), int(match.group(2))) < MIN_VERSION or match.group(1) != "1":
        raise UserError(
            f"{binary} is borg {match.group(0)}; incus-borg needs borg 1.4 or newer 1.x: "
            "pip install 'borgbackup>=1.4,<2'"
        )
    return match.group(0)


class _VersionCheck:
    """`checked_version`, remembered per borg binary in the user's cache directory, else run
    in a background thread, so that no borg command waits for it."""

    def __init__(self, binary: str) -> None:
        self._outcome: list[str | UserError] = []
        self._key = _binary_key(binary)
        known = _version_cache().get(self._key) if self._key else None
        if isinstance(known, str):
            self._outcome.append(known)
        self._thread = threading.Thread(target=self._check, args=(binary,), daemon=True)
        if not self._outcome:
            self._thread.start()

    def _check(self, binary: str) -> None:
        try:
            version = checked_version(binary)
        except UserError as exc:
            self._outcome.append(exc)
            return
        self._outcome.append(version)
        if self._key:
            _remember_version(self._key, version)

    def result(self) -> str:
        """The version, once known; raises the check's UserError."""
        if self._thread.ident is not None:
            self._thread.join()
        outcome = self._outcome[0]
        if isinstance(outcome, UserError):
            raise outcome
        return outcome


def _binary_key(binary: str) -> str | None:
    """What identifies one installed borg: its real path, size and mtime."""
    try:
        real = os.path.realpath(binary)
        st = os.stat(real)
    except OSError:
        return None
    return f"{real}:{st.st_size}:{st.st_mtime_ns}"


def _version_cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "incus-borg" / "borg-versions.json"


def _version_cache() -> dict[str, Any]:
    try:
        data = json.loads(_version_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember_version(key: str, version: str) -> None:
    """Store a checked version (best effort: a cache that cannot be written is skipped)."""
    path = _version_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps({**_version_cache(), key: version}))
        os.replace(tmp, path)
    except OSError:
        pass


# --- argv builders -------------------------------------------------------------------------


def init_argv(repo: Repository, encryption: str) -> list[str]:
    """Create a repository (and its parent directories)."""
    return ["init", "--make-parent-dirs", "--encryption", encryption, repo.path]


def key_export_argv(repo: Repository, paper: bool = False) -> list[str]:
    """Export the repository key to stdout."""
    return ["key", "export", *(["--paper"] if paper else []), repo.path]


def list_argv(repo: Repository) -> list[str]:
    """List a repository's archives as JSON."""
    return ["list", "--json", repo.path]


def list_archives_argv(repo: Repository) -> list[str]:
    """Every archive, checkpoints too, as JSON with its comment and creating command line."""
    fmt = "{comment}{command_line}"
    return ["list", "--consider-checkpoints", "--json", "--format", fmt, repo.path]


def delete_argv(repo: Repository, archives: Sequence[str]) -> list[str]:
    """Delete archives from a repository."""
    return ["delete", repo.path, *archives]


def compact_argv(repo: Repository) -> list[str]:
    """Free the space of deleted archives, logging how much (append-only: nothing)."""
    return ["compact", "--info", repo.path]


def check_argv(repo: Repository, verify_data: bool) -> list[str]:
    """Check a repository and its archives (reading every chunk with `verify_data`)."""
    return ["check", *(["--verify-data"] if verify_data else []), repo.path]


def list_files_argv(repo: Repository, archive: str, path: str) -> list[str]:
    """Mode, owner, size and sha256 of every item below `path` in an archive, as JSON lines."""
    fmt = "{mode}{uid}{gid}{size}{sha256}{type}{path}"
    return ["list", "--json-lines", "--format", fmt, f"{repo.path}::{archive}", path]


def info_argv(repo: Repository) -> list[str]:
    """Repository information as JSON (cheap: proves it exists and the passphrase is right)."""
    return ["info", "--json", repo.path]


def create_argv(
    repo: Repository,
    archive: str,
    paths: Sequence[str],
    *,
    excludes: Sequence[str] = (),
    files_cache: str | None = None,
    progress: bool = False,
    comment: str = "",
) -> list[str]:
    """Create `archive` from `paths` (relative to the caller's working directory)."""
    # --list --filter=AME logs only files that were not unchanged in the files cache.
    argv = ["create", "--json", "--numeric-ids", "--list", "--filter=AME"]
    if comment:
        argv += ["--comment", comment]
    if files_cache:
        argv += ["--files-cache", files_cache]
    if progress:
        argv.append("--progress")
    for pattern in excludes:
        argv += ["--exclude", pattern]
    return [*argv, f"{repo.path}::{archive}", *paths]


def comment_argv(repo: Repository, archive: str, comment: str) -> list[str]:
    """Set an archive's comment (borg rewrites its metadata, not its data)."""
    return ["recreate", "--comment", comment, f"{repo.path}::{archive}"]


def extract_stdout_argv(repo: Repository, archive: str, path: str) -> list[str]:
    """One file of an archive, on stdout."""
    return ["extract", "--stdout", f"{repo.path}::{archive}", path]


def export_tar_argv(repo: Repository, archive: str, path: str, strip: int) -> list[str]:
    """A subtree of an archive as an uncompressed tar stream on stdout."""
    return ["export-tar", "--strip-components", str(strip), f"{repo.path}::{archive}", "-", path]


def extract_argv(
    repo: Repository,
    archive: str,
    paths: Sequence[str],
    strip: int,
    excludes: Sequence[str] = (),
) -> list[str]:
    """Extract paths of an archive (less the `excludes` subtrees) into the working directory,
    with numeric owners and holes kept."""
    location = f"{repo.path}::{archive}"
    argv = ["extract", "--numeric-ids", "--sparse", "--strip-components", str(strip)]
    for path in excludes:
        argv += ["--exclude", f"pp:{path}"]
    return [*argv, location, *paths]


def list_tree_argv(repo: Repository, archive: str, path: str) -> list[str]:
    """`TYPE SIZE FLAGS`, link source and path of every item below `path`, each field ended
    by a NUL byte (no path holds one)."""
    fmt = "{type} {size} {flags}{NUL}{source}{NUL}{path}{NUL}"
    return ["list", "--format", fmt, f"{repo.path}::{archive}", path]


def list_exact_argv(repo: Repository, archive: str, paths: Sequence[str]) -> list[str]:
    """Which of exactly these paths an archive holds, one per line."""
    wanted = "|".join(re.escape(path) for path in paths)
    patterns = ["--pattern", f"+ re:^({wanted})$", "--pattern", "- re:."]
    return ["list", "--format", "{path}{NL}", *patterns, f"{repo.path}::{archive}"]


# --- runner ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Secrets:
    """Where the passphrase comes from: the config file or the caller's environment."""

    passphrase: str | None = None
    passcommand: str | None = None

    @classmethod
    def from_config(cls, config: Config) -> Secrets:
        """The secrets a configuration names."""
        return cls(config.encryption_passphrase, config.encryption_passcommand)

    @property
    def available(self) -> bool:
        """Whether borg will get a passphrase without asking."""
        return bool(self.passphrase or self.passcommand) or any(
            os.environ.get(name) for name in PASSPHRASE_ENV
        )

    def for_repository(self, repo: Repository) -> Secrets:
        """The repository's own passphrase settings when it has some, else these."""
        if repo.encryption_passphrase or repo.encryption_passcommand:
            return Secrets(repo.encryption_passphrase, repo.encryption_passcommand)
        return self

    def env(self) -> dict[str, str]:
        """Environment entries handing the passphrase to borg."""
        if self.passphrase:
            return {"BORG_PASSPHRASE": self.passphrase}
        if self.passcommand:
            return {"BORG_PASSCOMMAND": self.passcommand}
        return {}


@dataclass
class BorgResult:
    """What a finished borg call returned (`stalled_after`: the watchdog stopped it after that
    many seconds without a sign of progress)."""

    returncode: int
    stdout: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    stalled_after: float | None = None

    @property
    def problems(self) -> list[str]:
        """Borg's WARNING and ERROR log lines."""
        return [
            str(m.get("message", "")).strip()
            for m in self.messages
            if m.get("levelname") in ("WARNING", "ERROR", "CRITICAL")
        ]

    @property
    def warnings(self) -> list[str]:
        """What to report as warnings: borg's problems, when it exited with a warning code.

        (A successful run also logs harmless warnings, such as a new files cache.)
        """
        return self.problems if _is_warning(self.returncode) else []

    def json(self) -> Any:
        """stdout decoded as JSON."""
        return json.loads(self.stdout)

    @property
    def changed_files(self) -> int:
        """Files a `create --list` logged as added, modified or unreadable (not unchanged)."""
        return sum(1 for m in self.messages if m.get("type") == "file_status")


class Stalled(UserError):
    """Borg showed no sign of progress for the caller's `stall_timeout` and was stopped."""


def _is_warning(code: int) -> bool:
    return code == 1 or 100 <= code <= 127


def is_remote(path: str) -> bool:
    """Whether borg reaches the repository at `path` over ssh (ssh://... or user@host:path)."""
    return path.startswith("ssh://") or re.match(r"(?:[^@/:]+@)?[^@/:]+:(?!//)", path) is not None


def _ssh_words(command: str | None) -> list[str] | None:
    """`command` (default `ssh`) as argv when it runs ssh itself, else None (a wrapper)."""
    words = shlex.split(command or "ssh")
    return words if words and os.path.basename(words[0]) == "ssh" else None


def rsh_command(
    repo: Repository, inherited: str | None = None, ssh_log: Path | None = None
) -> str | None:
    """The BORG_RSH for `repo`: its ssh_command, else the `inherited` BORG_RSH, else `ssh`.

    When that command runs `ssh`, it gets the KEEPALIVE options unless it sets
    ServerAlive* itself, and `-E ssh_log` (ssh's own messages go to that file, read after borg
    ends, since borg may drop them) unless it chose its own -E.
    """
    command = repo.ssh_command or inherited
    if not is_remote(repo.path):
        return repo.ssh_command
    words = _ssh_words(command)
    if words is None:
        return command
    if not any("serveralive" in word.lower() for word in words):
        for name, value in KEEPALIVE.items():
            words += ["-o", f"{name}={value}"]
    if ssh_log is not None and not any(word.startswith("-E") for word in words):
        words += ["-E", str(ssh_log)]
    return shlex.join(words)


class Borg:
    """Runs borg for one configuration, with its secrets in the child's environment."""

    def __init__(self, secrets: Secrets, debug: bool = False, binary: str | None = None) -> None:
        self.binary = binary or find_borg()
        self._version = _VersionCheck(self.binary)
        self.secrets = secrets
        self.debug = debug

    @property
    def version(self) -> str:
        """The borg version; refuses an unsupported borg (checked once, in the background,
        while the first command runs)."""
        return self._version.result()

    def env(
        self,
        repo: Repository,
        extra: Mapping[str, str] | None = None,
        ssh_log: Path | None = None,
    ) -> dict[str, str]:
        """The child environment: modern exit codes, secrets, repository-specific settings
        (BORG_RSH from `rsh_command`)."""
        env = {**os.environ, "BORG_EXIT_CODES": "modern"}
        env |= self.secrets.for_repository(repo).env()
        env["BORG_DISPLAY_PASSPHRASE"] = "no"
        if repo.encryption == "none":
            env["BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK"] = "yes"
        rsh = rsh_command(repo, os.environ.get("BORG_RSH"), ssh_log)
        if rsh:
            env["BORG_RSH"] = rsh
        return {**env, **(extra or {})}

    def argv(self, args: Sequence[str], repo: Repository, progress: bool = False) -> list[str]:
        """The full command line: borg, the repository's common options (and --progress when
        asked for), then `args`."""
        common = ["--log-json"]
        if progress and "--progress" not in args:
            common.append("--progress")
        if repo.lock_wait is not None:
            common += ["--lock-wait", str(repo.lock_wait)]
        if repo.remote_path:
            common += ["--remote-path", repo.remote_path]
        if repo.upload_ratelimit:
            common += ["--upload-ratelimit", str(repo.upload_ratelimit)]
        argv = [self.binary, *common, *args]
        if self.debug:
            print("incus-borg: running " + " ".join(argv), file=sys.stderr)
        return argv

    def spawn(
        self,
        args: Sequence[str],
        repo: Repository,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> BorgProcess:
        """Start borg in the background; see `BorgProcess`, and `finished` for its result."""
        ssh_log = new_ssh_log(repo)
        return BorgProcess(self.argv(args, repo), self.env(repo, env, ssh_log), cwd, ssh_log)

    def finished(self, process: BorgProcess, args: Sequence[str], repo: Repository) -> BorgResult:
        """A background borg's result once it has exited; an error exit becomes a UserError."""
        result = process.result()
        _ = self.version
        if result.returncode == 0 or _is_warning(result.returncode):
            return result
        raise self._failure(args[0], repo, result)

    def popen(self, args: Sequence[str], repo: Repository) -> subprocess.Popen[bytes]:
        """Start borg with its stdout as a pipe, for streaming; check it with `raise_for`."""
        _ = self.version
        return subprocess.Popen(
            self.argv(args, repo),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(repo),
        )

    def run(
        self,
        args: Sequence[str],
        repo: Repository,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        show_progress: bool = False,
        ok_codes: Sequence[int] = (),
        retries: int | None = None,
        stall_timeout: float | None = None,
    ) -> BorgResult:
        """Run `borg --log-json ARGS` for `repo`; an error exit becomes a UserError whose one
        line names the cause (`explain_failure`; with --debug borg's last lines are printed).

        Warnings (exit 1 or 100-127) are returned for the caller to report. Codes in
        `ok_codes` are returned instead of raised. With `show_progress`, borg's progress
        lines are shown on stderr as they come.

        `retries`: how many times a connection failure (exit 80, 81, 87) is tried again, after
        sleeping RETRY_DELAY, then twice that, ...; None means CONNECTION_RETRIES. Pass 0
        while an instance is quiesced: one attempt, no sleep. A host key that failed
        verification or an ssh key the server refused is never tried again.

        `stall_timeout`: the longest time borg may show no sign of progress (no log line, no
        output) before it is stopped: SIGTERM, then SIGKILL and its ssh after STALL_GRACE s,
        its output drained meanwhile; then `Stalled` (a UserError naming the repository and
        "stalled") is raised, never retried. The call thus ends at most about stall_timeout +
        STALL_GRACE s after borg's last sign of life. --progress is added so that borg reports
        while it works (every 0.2 s while `create` reads or sends). Borg is silent while it
        waits for a lock (up to lock_wait) and while one chunk (up to 8 MiB) is sent at
        upload_ratelimit (8 MiB / 1000 kiB/s = 8 s): a shorter stall_timeout stops it there.
        None: no watchdog.
        """
        limit = CONNECTION_RETRIES if retries is None else retries
        for attempt in range(limit + 1):
            result = self._run_once(args, repo, env, cwd, show_progress, stall_timeout)
            if attempt == limit or not retryable(result):
                break
            delay = RETRY_DELAY * 2**attempt
            print(
                f"incus-borg: repository {repo.name}: connection failed, retrying in {delay:.0f} s",
                file=sys.stderr,
            )
            time.sleep(delay)
        _ = self.version
        code = result.returncode
        if result.stalled_after is None and (code == 0 or _is_warning(code) or code in ok_codes):
            return result
        raise self._failure(args[0], repo, result)

    def run_parallel(
        self,
        calls: Sequence[tuple[Sequence[str], Path | None]],
        repo: Repository,
        workers: int,
        ok_codes: Sequence[int] = (),
    ) -> list[BorgResult]:
        """Run several borg commands (args, working directory), at most `workers` at once.

        Every one that is still running is stopped on an interrupt; the first error exit
        (not in `ok_codes`) becomes a UserError once all have ended.
        """
        pending = list(enumerate(calls))
        running: dict[int, tuple[subprocess.Popen[bytes], list[threading.Thread]]] = {}
        outputs: dict[int, tuple[list[bytes], list[bytes]]] = {}
        results: dict[int, BorgResult] = {}
        started: dict[int, float] = {}
        try:
            while pending or running:
                while pending and len(running) < max(1, workers):
                    index, (args, cwd) = pending.pop(0)
                    with signals.deferred():  # every borg started is in `running`
                        proc = subprocess.Popen(
                            self.argv(args, repo),
                            stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            env=self.env(repo),
                            cwd=cwd,
                        )
                        outputs[index] = ([], [])
                        running[index] = (proc, _drain(proc, *outputs[index]))
                    started[index] = time.monotonic()
                for index, (proc, readers) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    for reader in readers:
                        reader.join()
                    out, err = (
                        b"".join(part).decode("utf-8", "replace") for part in outputs[index]
                    )
                    results[index] = BorgResult(proc.returncode, out, parse_log_json(err))
                    del running[index]
                    if self.debug:
                        took = time.monotonic() - started[index]
                        command = calls[index][0][0]
                        print(
                            f"incus-borg: borg {command} #{index} took {took:.2f} s",
                            file=sys.stderr,
                        )
                time.sleep(0.02)
        except BaseException:
            for proc, _ in running.values():
                _terminate(proc)
            raise
        _ = self.version
        ordered = [results[i] for i in range(len(calls))]
        for (args, _), result in zip(calls, ordered, strict=True):
            code = result.returncode
            if code != 0 and not _is_warning(code) and code not in ok_codes:
                raise self._failure(args[0], repo, result)
        return ordered

    def _failure(self, command: str, repo: Repository, result: BorgResult) -> UserError:
        """The error for a failed call; with --debug, borg's last lines are printed first."""
        if self.debug:
            print("incus-borg: borg's last messages:", file=sys.stderr)
            for line in raw_tail(result):
                print(f"  {line}", file=sys.stderr)
        kind = Stalled if result.stalled_after is not None else UserError
        return kind(explain_failure(command, repo, result))

    def _run_once(
        self,
        args: Sequence[str],
        repo: Repository,
        env: Mapping[str, str] | None,
        cwd: Path | None,
        show_progress: bool,
        stall_timeout: float | None,
    ) -> BorgResult:
        argv = self.argv(args, repo, progress=stall_timeout is not None)
        with _ssh_log(repo) as ssh_log:
            with subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env(repo, env, ssh_log),
                cwd=cwd,
            ) as proc:
                watchdog = _Watchdog(proc, stall_timeout)
                try:
                    out, messages = _collect(proc, watchdog, show_progress)
                finally:
                    watchdog.close()
                code = proc.wait()
            messages += ssh_messages(ssh_log.read_text(errors="replace") if ssh_log else "")
        # A borg that ended well just as the watchdog fired did not stall.
        stalled = watchdog.fired and code != 0 and not _is_warning(code)
        return BorgResult(code, out, messages, stall_timeout if stalled else None)


def _collect(
    proc: subprocess.Popen[bytes], watchdog: _Watchdog, show_progress: bool
) -> tuple[str, list[dict[str, Any]]]:
    """Borg's stdout and its log messages (progress shown, not kept), read until it ends;
    every bit of either is a sign of life for the watchdog. An interrupt stops borg."""
    assert proc.stdout is not None and proc.stderr is not None
    out: list[bytes] = []
    # Drain stdout meanwhile: a large listing would otherwise block borg (and us).
    reader = threading.Thread(target=_read_into, args=(proc.stdout.fileno(), out, watchdog))
    reader.start()
    messages: list[dict[str, Any]] = []
    try:
        for raw in proc.stderr:
            watchdog.touch()
            for message in parse_log_json(raw.decode("utf-8", "replace")):
                if "progress" not in str(message.get("type", "")):
                    messages.append(message)
                elif show_progress:
                    print("\r" + progress_line(message), end="", file=sys.stderr)
    except BaseException:
        stop(proc)
        raise
    finally:
        reader.join()
        if show_progress:
            print(file=sys.stderr)
    return b"".join(out).decode("utf-8", "replace"), messages


def _read_into(fd: int, sink: list[bytes], watchdog: _Watchdog) -> None:
    while chunk := os.read(fd, 1 << 16):
        sink.append(chunk)
        watchdog.touch()


class _Watchdog:
    """Stops a borg (and its ssh) that shows no sign of progress for `timeout` seconds."""

    def __init__(self, proc: subprocess.Popen[bytes], timeout: float | None) -> None:
        self.proc = proc
        self.timeout = timeout
        self.fired = False
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        if timeout is not None:
            self._thread.start()

    def touch(self) -> None:
        """Borg just showed a sign of life."""
        self._last = time.monotonic()

    def close(self) -> None:
        """Stop watching (once borg's output has ended)."""
        self._done.set()
        if self._thread.ident is not None:
            self._thread.join()

    def _watch(self) -> None:
        assert self.timeout is not None
        while not self._done.wait(min(0.5, self.timeout / 4)):
            if time.monotonic() - self._last >= self.timeout:
                self.fired = True
                children = _children(self.proc.pid)
                _terminate(self.proc, STALL_GRACE)
                for pid in children:  # its ssh waits for a server that no longer answers
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGTERM)
                return


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (its ssh, for a remote repository)."""
    found: list[int] = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in listing.read_text().split()]
    return found


@contextlib.contextmanager
def _ssh_log(repo: Repository) -> Iterator[Path | None]:
    """A private file for ssh's own messages, while borg reaches `repo` through ssh."""
    path = new_ssh_log(repo)
    try:
        yield path
    finally:
        if path is not None:
            path.unlink(missing_ok=True)


def new_ssh_log(repo: Repository) -> Path | None:
    """A new private (0600) file for ssh's own messages, when borg reaches `repo` through
    ssh; the caller removes it."""
    if not is_remote(repo.path) or not _ssh_words(repo.ssh_command or os.environ.get("BORG_RSH")):
        return None
    fd, name = tempfile.mkstemp(prefix="incus-borg-ssh-", suffix=".log")
    os.close(fd)
    return Path(name)


def ssh_messages(log: str) -> list[dict[str, Any]]:
    """ssh's own lines (from its -E log) as log messages of borg's shape."""
    return [
        {"type": "log_message", "levelname": "INFO", "name": "ssh", "message": line.strip()}
        for line in log.splitlines()
        if line.strip()
    ]


def _drain(
    proc: subprocess.Popen[bytes], out: list[bytes], err: list[bytes]
) -> list[threading.Thread]:
    """Read a child's stdout and stderr in threads, so that it never blocks on a full pipe."""
    readers = [
        threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True),  # type: ignore[union-attr]
        threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True),  # type: ignore[union-attr]
    ]
    for reader in readers:
        reader.start()
    return readers


def stop(proc: subprocess.Popen[bytes], grace: float = 15) -> None:
    """End an interrupted borg: SIGTERM (it cleans up), drain its log meanwhile, then SIGKILL.

    Without draining, borg blocks writing its log to a pipe nobody reads, and never exits.
    """
    assert proc.stderr is not None
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    _terminate(proc, grace)


def _terminate(proc: subprocess.Popen[bytes], grace: float = 15) -> None:
    """SIGTERM a borg whose output is being read, then SIGKILL it after `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def progress_line(message: Mapping[str, Any]) -> str:
    """One progress message of borg's, as a short line."""
    if message.get("type") == "archive_progress":
        size = int(message.get("original_size") or 0) / 1e6
        return f"{message.get('nfiles', 0)} files, {size:.1f} MB read  {message.get('path', '')}"[
            :100
        ]
    return str(message.get("message", ""))[:100]


def raise_for(command: str, repo: Repository, code: int, stderr: str) -> None:
    """Raise a UserError for a streamed borg call that failed (see `Borg.popen`)."""
    if code != 0 and not _is_warning(code):
        raise UserError(
            explain_failure(command, repo, BorgResult(code, "", parse_log_json(stderr)))
        )


def parse_log_json(stderr: str) -> list[dict[str, Any]]:
    """Borg's --log-json lines as dicts; lines that are not JSON become plain messages."""
    messages: list[dict[str, Any]] = []
    for line in stderr.splitlines():
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            item = {"type": "log_message", "levelname": "ERROR", "message": line}
        if isinstance(item, dict):
            messages.append(item)
    return messages


# --- what went wrong -------------------------------------------------------------------------

_HOST_KEY = re.compile(
    r"Host key verification failed|REMOTE HOST IDENTIFICATION HAS CHANGED"
    r"|host key for .* has changed|No \S+ host key is known for",
    re.I,
)
_HOST_KEY_DETAIL = re.compile(r"Host key for .* has changed.*|No \S+ host key is known for .*")
_DENIED = re.compile(r"Permission denied \((?:[\w-]+,)*publickey")
_NO_IDENTITY = re.compile(r"Identity file (.+?) not accessible")
_NO_SPACE = re.compile(
    r"No space left on device|\[Errno 28\]|Disk quota exceeded|\[Errno 122\]"
    r"|Insufficient free space|storage quota .*exceeded",
    re.I,
)
_EXCEPTION = re.compile(r"(?:\w+\.)*\w*(?:Error|Exception|Exceeded)\b(?::.*)?")
_LOCK = re.compile(r"Failed to create/acquire the lock .*")
_RELOCATED = re.compile(r"previously located at (\S+)")
_NOT_A_CAUSE = ("Warning: Permanently added", "Borg server:", "Connection closed by remote host")


@dataclass(frozen=True)
class Cause:
    """What a failed borg call ran into: a `kind` and the line of borg's or ssh's naming it."""

    kind: str  # stalled, host-key, ssh-key, no-space, relocated, rolled-back, locked, missing,
    # connection
    detail: str = ""
    remote: bool = False  # found on the server (its traceback), not on this host


# Causes that another attempt cannot cure.
NEVER_RETRIED = frozenset({"stalled", "host-key", "ssh-key"})


def _lines(result: BorgResult) -> list[str]:
    """Every line of every message, borg's "Remote: " prefix (ssh's forwarded lines) removed."""
    lines = []
    for message in result.messages:
        for line in str(message.get("message", "")).splitlines():
            line = line.strip().removeprefix("Remote: ").strip()
            if line:
                lines.append(line)
    return lines


def _first(pattern: re.Pattern[str], lines: Sequence[str]) -> str | None:
    return next((line for line in lines if pattern.search(line)), None)


def diagnose(result: BorgResult) -> Cause | None:
    """The cause of a failed call, from borg's messages, the server's traceback it forwards
    and ssh's own lines; None when none is recognised."""
    if result.stalled_after is not None:
        return Cause("stalled", f"no progress for {result.stalled_after:g} s")
    lines = _lines(result)
    if _first(_HOST_KEY, lines):
        return Cause("host-key", _first(_HOST_KEY_DETAIL, lines) or "Host key verification failed.")
    if denied := _first(_DENIED, lines):
        identity = _first(_NO_IDENTITY, lines)
        return Cause("ssh-key", f"{identity.rstrip('.')}; {denied}" if identity else denied)
    if _first(_NO_SPACE, lines):
        remote = any(
            line.startswith("Borg server:") or line.endswith(" in serve") for line in lines
        )
        exception = [line for line in lines if _NO_SPACE.search(line) and _EXCEPTION.match(line)]
        return Cause("no-space", (exception or [_first(_NO_SPACE, lines) or ""])[-1], remote)
    ids = {str(m.get("msgid", "")) for m in result.messages}
    if moved := _first(_RELOCATED, lines):
        return Cause("relocated", _RELOCATED.search(moved).group(1))  # type: ignore[union-attr]
    if "Cache.RepositoryReplay" in ids:
        return Cause("rolled-back", _first(re.compile("newer than repository"), lines) or "")
    if result.returncode == 73 or "LockTimeout" in ids:
        return Cause("locked", _first(_LOCK, lines) or "")
    if result.returncode == 13 or "Repository.DoesNotExist" in ids:
        return Cause("missing")
    if result.returncode in CONNECTION_FAILURES:
        said = [line for line in lines if not line.startswith(_NOT_A_CAUSE)]
        return Cause("connection", said[-1] if said else "connection closed")
    return None


def retryable(result: BorgResult) -> bool:
    """Whether a failed call may succeed when simply tried again: a connection failure,
    unless the host key or the ssh key was refused, or the call stalled."""
    if result.returncode not in CONNECTION_FAILURES:
        return False
    cause = diagnose(result)
    return cause is None or cause.kind not in NEVER_RETRIED


def _other_failure(command: str, repo: Repository, result: BorgResult) -> str:
    """The line for a failure with no recognised cause: borg's exception, else its last error."""
    lines = _lines(result)
    exceptions = [line for line in lines if _EXCEPTION.fullmatch(line)]
    errors = [
        problem.splitlines()[0]
        for problem in result.problems
        if problem and not problem.startswith(("Traceback", "Borg server:"))
    ]
    detail = (exceptions or errors or ["no message"])[-1]
    return f"borg {command} failed on repository {repo.name} (exit {result.returncode}): {detail}"


def explain_failure(command: str, repo: Repository, result: BorgResult) -> str:
    """One line naming what went wrong and how to fix it."""
    name, where = repo.name, f"{repo.name} ({repo.path})"
    cause = diagnose(result)
    kind, detail = (cause.kind, cause.detail.rstrip(".")) if cause else ("", "")
    lock_wait = repo.lock_wait if repo.lock_wait is not None else 1
    no_space_where = (
        "on the server of"
        if cause and cause.remote
        else "on this host (borg's cache, ~/.cache/borg) for"
        if is_remote(repo.path)
        else "on device for"
    )
    explained = {
        "stalled": f"repository {where} stalled: borg {command} showed {detail} and was "
        "stopped; check that the server, its disk and the network answer",
        "host-key": f"cannot reach repository {where}: the server's host key failed "
        f"verification ({detail}); not retried. If the server's key changed on purpose, "
        "check its fingerprint and replace its known_hosts entry (ssh-keygen -R HOST), else "
        "someone may be intercepting the connection",
        "ssh-key": f"cannot reach repository {where}: the server refused this host's ssh key "
        f"({detail}); not retried. Check the key given with -i in ssh_command and the "
        "server's authorized_keys",
        "no-space": f"no space left {no_space_where} repository {where} ({detail}): free "
        "space there (an append-only server frees the space of deleted runs only when its "
        "owner compacts)",
        "relocated": f"repository {name} is at {repo.path} but this host knew it at "
        f"{detail}: if it was moved on purpose, accept the move once with "
        f"BORG_RELOCATED_REPO_ACCESS_IS_OK=yes in the environment (e.g. "
        f"`BORG_RELOCATED_REPO_ACCESS_IS_OK=yes incus-borg list --repository {name}`), "
        "else fix its path",
        "rolled-back": f"repository {where} is older than this host last saw it ({detail}): "
        "if its owner rolled it back on purpose, clear this host's record of it (README, "
        "Offsite repositories: bringing deleted runs back), else find out who replaced it",
        "locked": f"repository {where} is locked by another process: borg waited "
        f"{lock_wait} s for its lock ({detail}); retry later, raise lock_wait, or run "
        f"`borg break-lock {repo.path}` if no borg is using it",
        "missing": f"repository {where} does not exist: run `incus-borg init`, or fix its path",
        "connection": f"cannot reach repository {where}: {detail}",
    }
    known = {
        15: f"{repo.path} is not a Borg repository: fix the path of repository {name}, "
        "or run `incus-borg init` for a new one",
        50: f"repository {name} is encrypted and no passphrase is configured: set "
        "encryption_passphrase or encryption_passcommand, or BORG_PASSPHRASE",
        51: f"the encryption_passcommand for repository {name} failed: check that it prints "
        "the passphrase",
        52: f"wrong passphrase for repository {name}: check encryption_passphrase, "
        "encryption_passcommand or BORG_PASSPHRASE",
    }
    if kind:
        return explained[kind]
    return known.get(result.returncode) or _other_failure(command, repo, result)


def raw_tail(result: BorgResult, limit: int = 30) -> list[str]:
    """The last `limit` lines of borg's and ssh's messages, as they came (for --debug)."""
    return [
        line
        for message in result.messages
        for line in str(message.get("message", "")).splitlines()
        if line.strip()
    ][-limit:]


class BorgProcess:
    """A borg running in the background: its output drained as it comes (so it never blocks
    on a full pipe), the time of its last log line noted, and it dies with incus-borg."""

    def __init__(
        self, argv: list[str], env: Mapping[str, str], cwd: Path | None, ssh_log: Path | None
    ) -> None:
        self.ssh_log = ssh_log
        # setpriv's parent-death signal: a borg whose incus-borg died is killed at once,
        # instead of finishing (and committing) a run that nobody completes.
        with signals.deferred():
            self.proc = subprocess.Popen(
                ["setpriv", "--pdeathsig", "KILL", "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=cwd,
            )
        self.messages: list[dict[str, Any]] = []
        self.progress: dict[str, Any] | None = None  # the latest progress message
        self.last_activity = time.monotonic()
        self._terminated: float | None = None
        self._out: list[bytes] = []
        self._readers = [
            threading.Thread(target=self._read_log, daemon=True),
            threading.Thread(target=lambda: self._out.append(self._stdout.read()), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def _stdout(self) -> Any:
        return self.proc.stdout

    @property
    def pid(self) -> int:
        """The borg's process id."""
        return self.proc.pid

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            for message in parse_log_json(raw.decode("utf-8", "replace")):
                if "progress" in str(message.get("type", "")):
                    self.progress = message
                else:
                    self.messages.append(message)
            self.last_activity = time.monotonic()

    def running(self) -> bool:
        """Whether borg has not exited yet."""
        return self.proc.poll() is None

    def stop(self, grace: float = 15) -> None:
        """SIGTERM (borg cleans up), then SIGKILL (with its ssh) after `grace` seconds."""
        self.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)
        self.kill()

    def kill(self) -> None:
        """SIGKILL borg (it dies even while the kernel holds one of its opens), and its ssh,
        which would wait for a server that no longer answers."""
        children = _children(self.proc.pid)
        if self.running():
            self.proc.kill()
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)

    def terminate(self) -> None:
        """Ask borg to stop (SIGTERM) without waiting; see `kill_after`."""
        if self.running() and self._terminated is None:
            self._terminated = time.monotonic()
            self.proc.terminate()

    def kill_after(self, grace: float) -> None:
        """SIGKILL a borg asked to stop more than `grace` seconds ago that still runs."""
        if self._terminated and time.monotonic() - self._terminated > grace and self.running():
            self.kill()

    def result(self) -> BorgResult:
        """What borg returned (with ssh's own messages), once it has exited."""
        code = self.proc.wait()
        for reader in self._readers:
            reader.join()
        if self.ssh_log is not None:
            self.messages += ssh_messages(self.ssh_log.read_text(errors="replace"))
            self.ssh_log.unlink(missing_ok=True)
        return BorgResult(code, b"".join(self._out).decode("utf-8", "replace"), self.messages)
