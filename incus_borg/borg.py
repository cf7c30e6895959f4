"""The only code that runs `borg`: argv builders (pure functions) and one runner.

Secrets travel in the child's environment only, never in argv or logs. Every call runs
with BORG_EXIT_CODES=modern and --log-json, so failures map to clear messages.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
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
    """What a finished borg call returned."""

    returncode: int
    stdout: str
    messages: list[dict[str, Any]] = field(default_factory=list)

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


def _is_warning(code: int) -> bool:
    return code == 1 or 100 <= code <= 127


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

    def env(self, repo: Repository, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The child environment: modern exit codes, secrets, repository-specific settings."""
        env = {**os.environ, "BORG_EXIT_CODES": "modern"}
        env |= self.secrets.for_repository(repo).env()
        env["BORG_DISPLAY_PASSPHRASE"] = "no"
        if repo.encryption == "none":
            env["BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK"] = "yes"
        if repo.ssh_command:
            env["BORG_RSH"] = repo.ssh_command
        return {**env, **(extra or {})}

    def argv(self, args: Sequence[str], repo: Repository) -> list[str]:
        """The full command line: borg, the repository's common options, then `args`."""
        common = ["--log-json"]
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
        return BorgProcess(self.argv(args, repo), self.env(repo, env), cwd)

    def finished(self, process: BorgProcess, args: Sequence[str], repo: Repository) -> BorgResult:
        """A background borg's result once it has exited; an error exit becomes a UserError."""
        result = process.result()
        _ = self.version
        if result.returncode == 0 or _is_warning(result.returncode):
            return result
        raise UserError(explain_failure(args[0], repo, result))

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
    ) -> BorgResult:
        """Run `borg --log-json ARGS` for `repo`; an error exit becomes a UserError.

        Warnings (exit 1 or 100-127) are returned for the caller to report. Codes in
        `ok_codes` are returned instead of raised. With `show_progress`, borg's progress
        lines are shown on stderr as they come.
        """
        for attempt in range(CONNECTION_RETRIES + 1):
            result = self._run_once(args, repo, env, cwd, show_progress)
            if result.returncode not in CONNECTION_FAILURES or attempt == CONNECTION_RETRIES:
                break
            delay = RETRY_DELAY * 2**attempt
            print(
                f"incus-borg: repository {repo.name}: connection failed, retrying in {delay:.0f} s",
                file=sys.stderr,
            )
            time.sleep(delay)
        _ = self.version
        code = result.returncode
        if code == 0 or _is_warning(code) or code in ok_codes:
            return result
        raise UserError(explain_failure(args[0], repo, result))

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
                raise UserError(explain_failure(args[0], repo, result))
        return ordered

    def _run_once(
        self,
        args: Sequence[str],
        repo: Repository,
        env: Mapping[str, str] | None,
        cwd: Path | None,
        show_progress: bool,
    ) -> BorgResult:
        with subprocess.Popen(
            self.argv(args, repo),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env(repo, env),
            cwd=cwd,
        ) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            out: list[bytes] = []
            # Drain stdout meanwhile: a large listing would otherwise block borg (and us).
            reader = threading.Thread(target=lambda: out.append(proc.stdout.read()))  # type: ignore[union-attr]
            reader.start()
            messages: list[dict[str, Any]] = []
            try:
                for raw in proc.stderr:
                    messages += parse_log_json(raw.decode("utf-8", "replace"))
                    if show_progress and messages and "progress" in messages[-1].get("type", ""):
                        print("\r" + progress_line(messages[-1]), end="", file=sys.stderr)
            except BaseException:
                stop(proc)
                raise
            finally:
                reader.join()
            code = proc.wait()
        if show_progress:
            print(file=sys.stderr)
        return BorgResult(code, b"".join(out).decode("utf-8", "replace"), messages)


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


def explain_failure(command: str, repo: Repository, result: BorgResult) -> str:
    """One line telling what went wrong and how to fix it."""
    name = repo.name
    known = {
        13: f"repository {name} ({repo.path}) does not exist: run `incus-borg init`",
        15: f"{repo.path} is not a Borg repository: fix the path of repository {name}, "
        "or run `incus-borg init` for a new one",
        50: f"repository {name} is encrypted and no passphrase is configured: set "
        "encryption_passphrase or encryption_passcommand, or BORG_PASSPHRASE",
        51: f"the encryption_passcommand for repository {name} failed: check that it prints "
        "the passphrase",
        52: f"wrong passphrase for repository {name}: check encryption_passphrase, "
        "encryption_passcommand or BORG_PASSPHRASE",
        73: f"repository {name} is locked by another borg process (lock wait expired): retry "
        "later, or run `borg break-lock` if no borg is running",
    }
    if result.returncode in CONNECTION_FAILURES:
        errors = [m for m in result.problems if m]
        detail = errors[0].splitlines()[0] if errors else "connection closed"
        return f"cannot reach repository {name} ({repo.path}): {detail}"
    if result.returncode in known:
        return known[result.returncode]
    # Borg logs a traceback as its last ERROR for some failures: name the cause instead.
    errors = [m for m in result.problems if m and not m.startswith("Traceback")]
    detail = errors[-1].splitlines()[0] if errors else "no message"
    return f"borg {command} failed on repository {name} (exit {result.returncode}): {detail}"


class BorgProcess:
    """A borg running in the background: its output drained as it comes (so it never blocks
    on a full pipe), the time of its last log line noted, and it dies with incus-borg."""

    def __init__(self, argv: list[str], env: Mapping[str, str], cwd: Path | None) -> None:
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
            self.messages += parse_log_json(raw.decode("utf-8", "replace"))
            self.last_activity = time.monotonic()

    def latest_progress(self) -> dict[str, Any] | None:
        """Borg's latest progress message, if it sent one."""
        for message in reversed(self.messages[-50:]):
            if "progress" in str(message.get("type", "")):
                return dict(message)
        return None

    def running(self) -> bool:
        """Whether borg has not exited yet."""
        return self.proc.poll() is None

    def stop(self, grace: float = 15) -> None:
        """SIGTERM (borg cleans up), then SIGKILL after `grace` seconds."""
        if self.running():
            _terminate(self.proc, grace)

    def kill(self) -> None:
        """SIGKILL borg (it dies even while the kernel holds one of its opens)."""
        if self.running():
            self.proc.kill()

    def terminate(self) -> None:
        """Ask borg to stop (SIGTERM) without waiting; see `kill_after`."""
        if self.running() and self._terminated is None:
            self._terminated = time.monotonic()
            self.proc.terminate()

    def kill_after(self, grace: float) -> None:
        """SIGKILL a borg asked to stop more than `grace` seconds ago that still runs."""
        if self._terminated and time.monotonic() - self._terminated > grace and self.running():
            self.proc.kill()

    def result(self) -> BorgResult:
        """What borg returned, once it has exited."""
        code = self.proc.wait()
        for reader in self._readers:
            reader.join()
        return BorgResult(code, b"".join(self._out).decode("utf-8", "replace"), self.messages)
