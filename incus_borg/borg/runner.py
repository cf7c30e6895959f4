"""Running borg: secrets in the child's environment only (never in argv or logs), modern
exit codes and --log-json on every call, retries of broken connections, a watchdog for
stalls, and borgs in the background that die with incus-borg."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import profile
from ..config import Config, Repository
from ..errors import UserError
from ..host import signals, testpoints
from .failures import explain_failure, raw_tail, retryable
from .result import BorgResult, Stalled, is_warning, parse_log_json, progress_line
from .ssh import new_ssh_log, rsh_command, ssh_messages, temporary_ssh_log
from .version import VersionCheck, find_borg

CONNECTION_RETRIES = 2

RETRY_DELAY = 1.0

# Seconds between SIGTERM and SIGKILL for a borg that stalled (one waiting on a stopped server
# ignores SIGTERM: it tries to roll back through that server).
STALL_GRACE = 3.0

PASSPHRASE_ENV = ("BORG_PASSPHRASE", "BORG_PASSCOMMAND", "BORG_PASSPHRASE_FD")


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


class Borg:
    """Runs borg for one configuration, with its secrets in the child's environment."""

    def __init__(self, secrets: Secrets, debug: bool = False, binary: str | None = None) -> None:
        self.binary = binary or find_borg()
        self._version = VersionCheck(self.binary)
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
        if result.returncode == 0 or is_warning(result.returncode):
            return result
        raise self._failure(args[0], repo, result)

    def popen(self, args: Sequence[str], repo: Repository) -> subprocess.Popen[bytes]:
        """Start borg with its stdout as a pipe, for streaming; check it with `raise_for`."""
        _ = self.version
        with signals.deferred():  # an interrupt never leaves a borg nobody knows of
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
        with profile.phase(f"borg {args[0]}"):
            for attempt in range(limit + 1):
                result = self._run_once(args, repo, env, cwd, show_progress, stall_timeout)
                if attempt == limit or not retryable(result):
                    break
                delay = RETRY_DELAY * 2**attempt
                print(
                    f"incus-borg: repository {repo.name}: connection failed, retrying in "
                    f"{delay:.0f} s",
                    file=sys.stderr,
                )
                time.sleep(delay)
        _ = self.version
        code = result.returncode
        if result.stalled_after is None and (code == 0 or is_warning(code) or code in ok_codes):
            return result
        raise self._failure(args[0], repo, result)

    def run_parallel(
        self,
        calls: Sequence[tuple[Sequence[str], Path | None]],
        repo: Repository,
        workers: int,
        ok_codes: Sequence[int] = (),
        pause: str = "",
    ) -> list[BorgResult]:
        """Run several borg commands (args, working directory), at most `workers` at once
        (`pause`: the test pause point reached once the first of them run).

        Every one that is still running is stopped on an interrupt; the first error exit
        (not in `ok_codes`) becomes a UserError once all have ended.
        """
        commands = " + ".join(sorted({args[0] for args, _ in calls}))
        with profile.phase(f"borg {commands} (side by side)"):
            return self._run_parallel(calls, repo, workers, ok_codes, pause)

    def _run_parallel(
        self,
        calls: Sequence[tuple[Sequence[str], Path | None]],
        repo: Repository,
        workers: int,
        ok_codes: Sequence[int],
        pause: str,
    ) -> list[BorgResult]:
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
                if pause:
                    testpoints.reached(pause)
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
            if code != 0 and not is_warning(code) and code not in ok_codes:
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
        with temporary_ssh_log(repo) as ssh_log:
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
        stalled = watchdog.fired and code != 0 and not is_warning(code)
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


def raise_for(command: str, repo: Repository, code: int, stderr: str) -> None:
    """Raise a UserError for a streamed borg call that failed (see `Borg.popen`)."""
    if code != 0 and not is_warning(code):
        raise UserError(
            explain_failure(command, repo, BorgResult(code, "", parse_log_json(stderr)))
        )


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
        self._waiting = threading.Event()
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
        """Read borg's log as it comes, with plain reads of its pipe (see `drained`)."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        pending = b""
        while True:
            self._waiting.set()  # everything read so far is handled
            chunk = os.read(fd, 1 << 16)
            self._waiting.clear()
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            self._handle(lines)
        self._handle([pending])

    def _handle(self, lines: list[bytes]) -> None:
        for message in parse_log_json(b"\n".join(lines).decode("utf-8", "replace")):
            if "progress" in str(message.get("type", "")):
                self.progress = message
            else:
                self.messages.append(message)
        self.last_activity = time.monotonic()

    def drained(self) -> bool:
        """Whether every log line borg has written so far is in `messages`: true once the
        reader waits for more and the pipe holds nothing (ask it while borg is held, say at
        the gate, so that it writes nothing meanwhile)."""
        assert self.proc.stderr is not None
        if not self._waiting.is_set():
            return False
        unread = fcntl.ioctl(self.proc.stderr.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(unread, sys.byteorder) == 0

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
