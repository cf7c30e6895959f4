"""What borg's failures are called: recorded --log-json lines (and ssh's -E log) of real
failures against a private sshd and full, locked, moved and rolled-back repositories, and the
runner's retry and watchdog rules against a stand-in borg. Pure: needs neither root nor Incus."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from incus_borg.borg import (
    Borg,
    BorgResult,
    Secrets,
    Stalled,
    diagnose,
    explain_failure,
    parse_log_json,
    retryable,
    rsh_command,
    ssh_messages,
)
from incus_borg.borg import runner as borg_runner
from incus_borg.config import Repository
from incus_borg.errors import UserError

# name: (borg's exit code, its --log-json stderr, ssh's -E log), as recorded from real failures
RECORDED: dict[str, tuple[int, str, str]] = {
    "hostkey_changed": (
        81,
        '{"type": "log_message", "time": 1796137881.4312627, "message": "Connection closed by remote host. Is borg working on the server?", "levelname": "ERROR", "name": "borg.archiver", "msgid": "ConnectionClosedWithHint"}\n',
        '@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\nIT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\nSomeone could be eavesdropping on you right now (man-in-the-middle attack)!\nIt is also possible that a host key has just been changed.\nThe fingerprint for the ED25519 key sent by the remote host is\nSHA256:6ZbcCrl55AechA9pS6hluMnYkXQu/94zWdldq0/r6U4.\nPlease contact your system administrator.\nAdd correct host key in /tmp/olab/wrong_known_hosts to get rid of this message.\nOffending ED25519 key in /tmp/olab/wrong_known_hosts:1\n  remove with:\n  ssh-keygen -f "/tmp/olab/wrong_known_hosts" -R "[127.0.0.1]:43315"\nHost key for [127.0.0.1]:43315 has changed and you have requested strict checking.\nHost key verification failed.\n',
    ),
    "hostkey_changed_forwarded": (
        81,
        '{"type": "log_message", "time": 1796137893.2847474, "message": "Remote: @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@", "levelname": "WARNING", "name": "root"}\n{"type": "log_message", "time": 1796137893.285258, "message": "Remote: @    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @", "levelname": "WARNING", "name": "root"}\n{"type": "log_message", "time": 1796137893.2853334, "message": "Remote: @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@", "levelname": "WARNING", "name": "root"}\n{"type": "log_message", "time": 1796137893.285389, "message": "Remote: IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!", "levelname": "WARNING", "name": "root"}\n{"type": "log_message", "time": 1796137893.285457, "message": "Remote: Someone could be eavesdropping on you right now (man-in-the-middle attack)!", "levelname": "WARNING", "name": "root"}\n{"type": "log_message", "time": 1796137893.2923474, "message": "Connection closed by remote host. Is borg working on the server?", "levelname": "ERROR", "name": "borg.archiver", "msgid": "ConnectionClosedWithHint"}\n',
        "",
    ),
    "hostkey_unknown_strict": (
        81,
        '{"type": "log_message", "time": 1796137892.487045, "message": "Connection closed by remote host. Is borg working on the server?", "levelname": "ERROR", "name": "borg.archiver", "msgid": "ConnectionClosedWithHint"}\n',
        "No ED25519 host key is known for [127.0.0.1]:43315 and you have requested strict checking.\nHost key verification failed.\n",
    ),
    "publickey_refused": (
        81,
        '{"type": "log_message", "time": 1796137884.3667645, "message": "Connection closed by remote host. Is borg working on the server?", "levelname": "ERROR", "name": "borg.archiver", "msgid": "ConnectionClosedWithHint"}\n',
        "root@127.0.0.1: Permission denied (publickey,keyboard-interactive).\n",
    ),
    "publickey_forwarded": (
        81,
        '{"type": "log_message", "time": 1796137894.3000438, "message": "Remote: root@127.0.0.1: Permission denied (publickey,keyboard-interactive).", "levelname": "WARNING", "name": "root"}\n{"type": "log_message", "time": 1796137894.3030066, "message": "Connection closed by remote host. Is borg working on the server?", "levelname": "ERROR", "name": "borg.archiver", "msgid": "ConnectionClosedWithHint"}\n',
        "",
    ),
    "ssh_key_missing": (
        81,
        '{"type": "log_message", "time": 1796137884.9038863, "message": "Remote: Warning: Identity file /tmp/olab/nokey not accessible: No such file or directory.", "levelname": "WARNING", "name": "root"}\n{"type": "log_message", "time": 1796137885.168195, "message": "Connection closed by remote host. Is borg working on the server?", "levelname": "ERROR", "name": "borg.archiver", "msgid": "ConnectionClosedWithHint"}\n',
        "root@127.0.0.1: Permission denied (publickey,keyboard-interactive).\n",
    ),
    "connection_refused": (
        81,
        '{"type": "log_message", "time": 1796137886.0663707, "message": "Connection closed by remote host. Is borg working on the server?", "levelname": "ERROR", "name": "borg.archiver", "msgid": "ConnectionClosedWithHint"}\n',
        "ssh: connect to host 127.0.0.1 port 1: Connection refused\n",
    ),
    "missing_remote": (
        13,
        '{"type": "log_message", "time": 1796137888.43981, "message": "Repository ssh://root@127.0.0.1:43315/tmp/olab/srv/repos/nope does not exist.", "levelname": "ERROR", "name": "borg.archiver", "msgid": "Repository.DoesNotExist"}\n',
        "",
    ),
    "missing_local": (
        13,
        '{"type": "log_message", "time": 1796137889.0017269, "message": "Repository /tmp/olab/nope does not exist.", "levelname": "ERROR", "name": "borg.archiver", "msgid": "Repository.DoesNotExist"}\n',
        "",
    ),
    "no_space_remote": (
        2,
        '{"type": "log_message", "time": 1796137940.0859883, "message": "Traceback (most recent call last):\\n\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/remote.py\\", line 252, in serve\\n    res = f(**args)\\n          ^^^^^^^^^\\n\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/repository.py\\", line 1270, in put\\n    segment, offset = self.io.write_put(id, data)\\n                      ^^^^^^^^^^^^^^^^^^^^^^^^^^^\\n\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/repository.py\\", line 1718, in write_put\\n    fd.write(b\'\'.join((crc, header, id, data)))\\n\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/platform/base.py\\", line 173, in write\\n    self.f.write(data)\\n\\nOSError: [Errno 28] No space left on device\\n", "levelname": "ERROR", "name": "borg.archiver", "msgid": "OSError"}\n{"type": "log_message", "time": 1796137940.0862846, "message": "Borg server: Platform: Linux vm 6.18.44-fc-v669 #1 SMP PREEMPT_DYNAMIC @0 x86_64\\nBorg server: Linux: Unknown Linux  \\nBorg server: Borg: 1.4.5  Python: CPython 3.11.7 msgpack: 1.2.1 fuse: None [pyfuse3,llfuse]\\nBorg server: PID: 28443  CWD: /root\\nBorg server: sys.argv: [\'/work/main/.venv/bin/borg\', \'serve\', \'--restrict-to-path\', \'/tmp/olab/srv/repos\']\\nBorg server: SSH_ORIGINAL_COMMAND: \'borg serve\'\\nPlatform: Linux vm 6.18.44-fc-v669 #1 SMP PREEMPT_DYNAMIC @0 x86_64\\nLinux: Unknown Linux  \\nBorg: 1.4.5  Python: CPython 3.11.7 msgpack: 1.2.1 fuse: None [pyfuse3,llfuse]\\nPID: 28396  CWD: /tmp/olab\\nsys.argv: [\'/work/main/.venv/bin/borg\', \'--log-json\', \'create\', \'--json\', \'ssh://root@127.0.0.1:43315/tmp/olab/srv/repos/full/r::a1\', \'big.bin\']\\nSSH_ORIGINAL_COMMAND: None\\n", "levelname": "ERROR", "name": "borg.archiver"}\n',
        "",
    ),
    "no_space_local": (
        2,
        '{"type": "log_message", "time": 1796137901.7397544, "message": "No space left on device, cleaning up partial transaction to free space.", "levelname": "WARNING", "name": "borg.repository"}\n{"type": "log_message", "time": 1796137901.746698, "message": "Local Exception", "levelname": "ERROR", "name": "borg.archiver", "msgid": "Exception"}\n{"type": "log_message", "time": 1796137901.7468488, "message": "Traceback (most recent call last):\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/archiver.py\\", line 5917, in main\\n    exit_code = archiver.run(args)\\n                ^^^^^^^^^^^^^^^^^^\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/archiver.py\\", line 5835, in run\\n    rc = func(args)\\n         ^^^^^^^^^^\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/archiver.py\\", line 205, in wrapper\\n    return method(self, args, repository=repository, **kwargs)\\n           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/archiver.py\\", line 737, in do_create\\n    create_inner(archive, cache, fso)\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/archiver.py\\", line 678, in create_inner\\n    self._rec_walk(path=path, parent_fd=None, name=None,\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/archiver.py\\", line 853, in _rec_walk\\n    status = self._process_any(path=path, parent_fd=parent_fd, name=name, st=st, fso=fso, cache=cache,\\n             ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/archiver.py\\", line 749, in _process_any\\n    return fso.process_file(path=path, parent_fd=parent_fd, name=name, st=st, cache=cache, strip_prefix=strip_prefix)\\n           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/archive.py\\", line 1603, in process_file\\n    self.process_file_chunks(item, cache, self.stats, self.show_progress, backup_io_iter(self.chunker.chunkify(None, fd)))\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/archive.py\\", line 1391, in process_file_chunks\\n    item.chunks.append(chunk_processor(chunk))\\n                       ^^^^^^^^^^^^^^^^^^^^^^\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/archive.py\\", line 1379, in chunk_processor\\n    chunk_entry = cache.add_chunk(chunk_id, data, stats, wait=False)\\n                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/cache.py\\", line 977, in add_chunk\\n    self.repository.put(id, data, wait=wait)\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/repository.py\\", line 1270, in put\\n    segment, offset = self.io.write_put(id, data)\\n                      ^^^^^^^^^^^^^^^^^^^^^^^^^^^\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/repository.py\\", line 1718, in write_put\\n    fd.write(b\'\'.join((crc, header, id, data)))\\n  File \\"/work/main/.venv/lib/python3.11/site-packages/borg/platform/base.py\\", line 173, in write\\n    self.f.write(data)\\nOSError: [Errno 28] No space left on device\\n\\nPlatform: Linux vm 6.18.44-fc-v669 #1 SMP PREEMPT_DYNAMIC @0 x86_64\\nLinux: Unknown Linux  \\nBorg: 1.4.5  Python: CPython 3.11.7 msgpack: 1.2.1 fuse: None [pyfuse3,llfuse]\\nPID: 26766  CWD: /tmp/olab\\nsys.argv: [\'/work/main/.venv/bin/borg\', \'--log-json\', \'create\', \'--json\', \'/tmp/olab/lfull/r::a1\', \'big.bin\']\\nSSH_ORIGINAL_COMMAND: None\\n", "levelname": "ERROR", "name": "borg.archiver"}\n',
        "",
    ),
    "locked_remote": (
        73,
        '{"type": "log_message", "time": 1796137908.255042, "message": "Failed to create/acquire the lock /tmp/olab/srv/repos/a/lock.exclusive (timeout).", "levelname": "ERROR", "name": "borg.archiver", "msgid": "LockTimeout"}\n',
        "",
    ),
    "locked_local": (
        73,
        '{"type": "log_message", "time": 1796137911.2431188, "message": "Failed to create/acquire the lock /tmp/olab/srv/repos/a/lock.exclusive (timeout).", "levelname": "ERROR", "name": "borg.archiver", "msgid": "LockTimeout"}\n',
        "",
    ),
    "relocated_remote": (
        62,
        '{"type": "question_prompt", "msgid": "BORG_RELOCATED_REPO_ACCESS_IS_OK", "message": "Warning: The repository at location ssh://root@127.0.0.1:43315/tmp/olab/srv/repos/a2 was previously located at ssh://root@127.0.0.1:43315/tmp/olab/srv/repos/a\\nDo you want to continue? [yN] "}\n{"type": "question_accepted_false", "msgid": "BORG_RELOCATED_REPO_ACCESS_IS_OK", "message": "Aborting."}\n{"type": "log_message", "time": 1796137927.4621797, "message": "Repository access aborted", "levelname": "ERROR", "name": "borg.archiver", "msgid": "Cache.RepositoryAccessAborted"}\n',
        "",
    ),
    "rolled_back": (
        64,
        '{"type": "log_message", "time": 1796137964.582053, "message": "Cache, or information obtained from the security directory is newer than repository - this is either an attack or unsafe (multiple repos with same ID)", "levelname": "ERROR", "name": "borg.archiver", "msgid": "Cache.RepositoryReplay"}\n',
        "",
    ),
    "archive_exists": (
        30,
        '{"type": "log_message", "time": 1796137944.4685118, "message": "Archive dup already exists", "levelname": "ERROR", "name": "borg.archiver", "msgid": "Archive.AlreadyExists"}\n',
        "",
    ),
}

OFFSITE = Repository(
    path="ssh://root@127.0.0.1:43315/tmp/olab/srv/repos/a", label="offsite", lock_wait=2
)
LOCAL = Repository(path="/tmp/olab/lfull/r", label="local")


def recorded(name: str) -> BorgResult:
    """A recorded failure as the runner sees it: borg's messages, then ssh's lines."""
    code, stderr, ssh_log = RECORDED[name]
    return BorgResult(code, "", parse_log_json(stderr) + ssh_messages(ssh_log))


@pytest.mark.parametrize(
    ("name", "kind", "words"),
    [
        (
            "hostkey_changed",
            "host-key",
            ["host key failed verification", "[127.0.0.1]:43315 has changed", "not retried"],
        ),
        ("hostkey_changed_forwarded", "host-key", ["host key failed verification"]),
        ("hostkey_unknown_strict", "host-key", ["No ED25519 host key is known"]),
        ("publickey_refused", "ssh-key", ["Permission denied (publickey", "authorized_keys"]),
        ("publickey_forwarded", "ssh-key", ["Permission denied (publickey"]),
        ("ssh_key_missing", "ssh-key", ["Identity file /tmp/olab/nokey not accessible"]),
        ("connection_refused", "connection", ["cannot reach repository offsite", "refused"]),
        ("missing_remote", "missing", ["does not exist", "incus-borg init"]),
        ("missing_local", "missing", ["does not exist"]),
        (
            "no_space_remote",
            "no-space",
            ["no space left on the server of repository offsite", "[Errno 28]"],
        ),
        ("no_space_local", "no-space", ["no space left on device for repository local"]),
        (
            "locked_remote",
            "locked",
            ["locked by another process", "waited 2 s", "/tmp/olab/srv/repos/a/lock.exclusive"],
        ),
        ("locked_local", "locked", ["locked by another process", "waited 1 s"]),
        (
            "relocated_remote",
            "relocated",
            ["knew it at ssh://root@127.0.0.1:43315/tmp/olab/srv/repos/a:", "=yes"],
        ),
        ("rolled_back", "rolled-back", ["older than this host last saw it"]),
    ],
)
def test_each_recorded_failure_names_its_cause(name: str, kind: str, words: list[str]) -> None:
    repo = LOCAL if name.endswith("_local") else OFFSITE
    result = recorded(name)
    cause = diagnose(result)
    assert cause is not None and cause.kind == kind
    line = explain_failure("create", repo, result)
    assert "\n" not in line
    for word in words:
        assert word in line, line


def test_the_old_messages_are_gone() -> None:
    """What these failures used to say instead of their cause."""
    remote = explain_failure("create", OFFSITE, recorded("no_space_remote"))
    assert "Platform" not in remote and "Borg server" not in remote
    assert "Local Exception" not in explain_failure("create", LOCAL, recorded("no_space_local"))
    for name in ("hostkey_changed", "hostkey_changed_forwarded"):
        line = explain_failure("info", OFFSITE, recorded(name))
        assert "@@@" not in line and "Is borg working on the server" not in line
    relocated = explain_failure("info", OFFSITE, recorded("relocated_remote"))
    assert relocated != "Repository access aborted" and "moved" in relocated


def test_an_unknown_failure_shows_borgs_own_line() -> None:
    line = explain_failure("create", OFFSITE, recorded("archive_exists"))
    assert line == "borg create failed on repository offsite (exit 30): Archive dup already exists"


def test_a_stall_is_named() -> None:
    result = BorgResult(-9, "", [], stalled_after=3.0)
    line = explain_failure("create", OFFSITE, result)
    assert line.startswith("repository offsite (ssh://") and "stalled" in line
    assert "no progress for 3 s" in line


def test_only_a_plain_connection_failure_is_retryable() -> None:
    assert retryable(recorded("connection_refused"))
    for name in ("hostkey_changed", "hostkey_changed_forwarded", "publickey_forwarded"):
        assert not retryable(recorded(name)), name
    assert not retryable(recorded("locked_remote"))


@pytest.mark.parametrize(
    ("path", "ssh_command", "inherited", "expected"),
    [
        (
            "ssh://h/r",
            None,
            None,
            "ssh -o ServerAliveInterval=10 -o ServerAliveCountMax=6",
        ),
        (
            "h:r",
            "ssh -i /k",
            None,
            "ssh -i /k -o ServerAliveInterval=10 -o ServerAliveCountMax=6",
        ),
        ("ssh://h/r", "ssh -o ServerAliveInterval=5", None, "ssh -o ServerAliveInterval=5"),
        ("ssh://h/r", "/usr/local/bin/my-rsh -x", None, "/usr/local/bin/my-rsh -x"),
        (
            "ssh://h/r",
            None,
            "/usr/bin/ssh -i /k",
            "/usr/bin/ssh -i /k -o ServerAliveInterval=10 -o ServerAliveCountMax=6",
        ),
        ("/var/backups/r", None, "ssh", None),
        ("/var/backups/r", "ssh -i /k", None, "ssh -i /k"),
    ],
)
def test_ssh_gets_keepalives_unless_it_sets_them(
    path: str, ssh_command: str | None, inherited: str | None, expected: str | None
) -> None:
    repo = Repository(path=path, ssh_command=ssh_command)
    assert rsh_command(repo, inherited) == expected


def test_ssh_logs_to_the_given_file_unless_it_chose_one() -> None:
    repo = Repository(path="ssh://h/r", ssh_command="ssh -i /k")
    assert rsh_command(repo, None, Path("/tmp/x.log")) == (
        "ssh -i /k -o ServerAliveInterval=10 -o ServerAliveCountMax=6 -E /tmp/x.log"
    )
    own = Repository(path="ssh://h/r", ssh_command="ssh -E /var/log/mine -o ServerAliveInterval=1")
    assert rsh_command(own, None, Path("/tmp/x.log")) == own.ssh_command


# --- the runner, with a stand-in borg ----------------------------------------------------------


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where the stand-in borg's script goes (`tmp_path/body`); it logs each call's argv."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    binary = tmp_path / "borg"
    binary.write_text(
        "#!/bin/sh\n"
        '[ "$1" = --version ] && { echo "borg 1.4.5"; exit 0; }\n'
        f'echo "$*" >> {tmp_path}/calls\n'
        f". {tmp_path}/body\n"
    )
    binary.chmod(0o755)
    return tmp_path


def calls(where: Path) -> list[str]:
    path = where / "calls"
    return path.read_text().splitlines() if path.exists() else []


def replay(where: Path, name: str) -> None:
    """Make the stand-in borg print a recorded failure's stderr and exit with its code."""
    code, stderr, _ = RECORDED[name]
    (where / "stderr").write_text(stderr)
    (where / "body").write_text(f"cat {where}/stderr >&2\nexit {code}\n")


def test_a_host_key_failure_is_never_retried(fake: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(borg_runner, "RETRY_DELAY", 10.0)
    replay(fake, "hostkey_changed_forwarded")
    started = time.monotonic()
    with pytest.raises(UserError, match="host key failed verification"):
        Borg(Secrets(), binary=str(fake / "borg")).run(["info"], OFFSITE)
    assert len(calls(fake)) == 1 and time.monotonic() - started < 5


def test_connection_failures_are_retried_unless_retries_is_zero(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(borg_runner, "RETRY_DELAY", 0.01)
    replay(fake, "connection_refused")
    runner = Borg(Secrets(), binary=str(fake / "borg"))
    with pytest.raises(UserError, match="cannot reach repository offsite"):
        runner.run(["info"], OFFSITE)
    assert len(calls(fake)) == 1 + borg_runner.CONNECTION_RETRIES
    monkeypatch.setattr(borg_runner, "RETRY_DELAY", 10.0)
    started = time.monotonic()
    with pytest.raises(UserError):
        runner.run(["info"], OFFSITE, retries=0)
    assert len(calls(fake)) == 2 + borg_runner.CONNECTION_RETRIES
    assert time.monotonic() - started < 5


def test_debug_shows_borgs_raw_tail(fake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    replay(fake, "no_space_remote")
    with pytest.raises(UserError, match="no space left on the server"):
        Borg(Secrets(), debug=True, binary=str(fake / "borg")).run(["create"], OFFSITE)
    err = capsys.readouterr().err
    assert "OSError: [Errno 28] No space left on device" in err
    assert "Borg server: Platform" in err


def test_the_watchdog_stops_a_silent_borg_and_its_children(
    fake: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(borg_runner, "STALL_GRACE", 1.0)
    (fake / "body").write_text(
        'echo \'{"type": "log_message", "levelname": "INFO", "message": "started"}\' >&2\n'
        f"sleep 300 & echo $! > {fake}/child\n"
        "trap '' TERM\n"  # deaf to SIGTERM, as a borg waiting on a stopped server
        "while :; do sleep 0.1; done\n"
    )
    started = time.monotonic()
    with pytest.raises(Stalled, match=r"repository offsite .* stalled") as raised:
        Borg(Secrets(), binary=str(fake / "borg")).run(
            ["create", "R::a", "p"], OFFSITE, stall_timeout=1
        )
    took = time.monotonic() - started
    assert 1 <= took < 1 + borg_runner.STALL_GRACE + 2, took
    assert "no progress for 1 s" in str(raised.value)
    assert calls(fake) == ["--log-json --progress --lock-wait 2 create R::a p"]
    child = int((fake / "child").read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_the_watchdog_spares_a_borg_that_reports_progress(fake: Path) -> None:
    line = '{"type": "archive_progress", "original_size": 1, "nfiles": 1, "path": "x"}'
    (fake / "body").write_text(
        f"for i in 1 2 3 4 5 6 7 8 9 10; do echo '{line}' >&2; sleep 0.2; done\necho '{{}}'\n"
    )
    result = Borg(Secrets(), binary=str(fake / "borg")).run(["create"], OFFSITE, stall_timeout=1)
    assert result.returncode == 0 and result.json() == {}
    assert result.messages == []  # progress lines are shown, not kept


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
