"""The export reader on what cannot run here (zfs, lvm, ceph, virtual machines), against the
recorded exchanges of exchanges.yaml replayed by a fake Incus on a unix socket: the reader
and quiesce mode chosen for each, the calls made (the backup asked for uncompressed and not
optimized, waited for, streamed, deleted), and the cleanup when Incus fails to make it or a
killed run left it behind."""

from __future__ import annotations

import io
import json
import socketserver
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml

from incus_borg import layout
from incus_borg.backup import plan
from incus_borg.backup.journal import Journal
from incus_borg.backup.policy import Policy
from incus_borg.backup.quiesce import Quiescer
from incus_borg.config import IncusSettings
from incus_borg.errors import UserError, Warnings
from incus_borg.incus import BackupOf, Incus

RECORDED = yaml.safe_load((Path(__file__).parent / "exchanges.yaml").read_text())
CASES = RECORDED["cases"]
ANSWERS = RECORDED["answers"]
BACKUP = "incus-borg-20261207-095043"
CREATED = ANSWERS["created"]["operation"]
REMOVED = ANSWERS["removed"]["operation"]
TAR_TYPES = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE}


def stream_of(case: dict[str, Any]) -> bytes:
    """A tar stream with the case's first members (each file a few bytes)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, kind in case["members"]:
            info = tarfile.TarInfo(name)
            info.type = TAR_TYPES[kind]
            data = f"{name}\n".encode() if kind == "file" else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass
class FakeIncus:
    """Answers the backups endpoints as recorded; `outcome` is how the backup ends ("done" or
    "failed"); `running` waits answer "still running" that many times first."""

    case: dict[str, Any]
    outcome: str = "done"
    running: int = 0
    held: bool = True  # whether Incus holds the backup (DELETE finds it)
    calls: list[tuple[str, str, Any]] = field(default_factory=list)

    def answer(self, method: str, path: str, body: Any) -> tuple[int, str, bytes]:
        self.calls.append((method, path, body))
        backups = self.case["backups"]
        base, _, query = backups.partition("?")
        one = f"{base}/{BACKUP}?{query}"
        if (method, path) == ("POST", backups):
            return self._json(ANSWERS["created"])
        if method == "GET" and path.startswith(f"{CREATED}/wait"):
            if self.running:
                return self._json(ANSWERS["running"])
            return self._json(ANSWERS[self.outcome])
        if (method, path) == ("GET", CREATED):  # asked after a wait that timed out
            if self.running:
                self.running -= 1
                return self._json(ANSWERS["running"])
            return self._json(ANSWERS[self.outcome])
        if (method, path) == ("GET", f"{base}/{BACKUP}/export?{query}"):
            return 200, "application/octet-stream", stream_of(self.case)
        if (method, path) == ("DELETE", one):
            if not self.held:
                return self._json(ANSWERS["not-found"], 404)
            self.held = False
            return self._json(ANSWERS["removed"])
        if method == "GET" and path.startswith(f"{REMOVED}/wait"):
            return self._json(ANSWERS["removal-done"])
        if (method, path) == ("GET", backups):
            return self._json(ANSWERS["no-backups"])
        if method == "GET" and path.startswith("/1.0/operations?"):
            return self._json(ANSWERS["no-operations"])
        return self._json(ANSWERS["not-found"], 404)

    @staticmethod
    def _json(answer: dict[str, Any], status: int = 200) -> tuple[int, str, bytes]:
        return status, "application/json", json.dumps(answer).encode()

    @property
    def requests(self) -> list[tuple[str, str]]:
        """The calls made, without their bodies and without the waits' timeouts."""
        return [
            (m, p.split("/wait")[0] + ("/wait" if "/wait" in p else "")) for m, p, _ in self.calls
        ]


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Any]:
    """Serve a FakeIncus at tmp_path/unix.socket: call the fixture with a case to start."""
    servers: list[_Server] = []

    def serve(case: dict[str, Any], **options: Any) -> tuple[Incus, FakeIncus]:
        fake = FakeIncus(case, **options)

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                status, kind, data = fake.answer(self.command, self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _reply

            def log_message(self, *args: Any) -> None:
                pass

            def address_string(self) -> str:
                return "unix"

        server = _Server(str(tmp_path / "unix.socket"), Handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return Incus(tmp_path, timeout=10), fake

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def item_of(case: dict[str, Any]) -> Any:
    """The plan's item for a case's record, with the mode `auto`."""
    record, pools = case["record"], case["pools"]
    wanted = Policy(mode="auto", mode_source="default")
    if record["kind"] == "instance":
        raw = {
            "project": record["project"],
            "name": record["name"],
            "type": record["type"],
            "status": record["status"],
            "expanded_devices": {"root": {"path": "/", "pool": record["pool"], "type": "disk"}},
            "snapshot_names": record["snapshots"],
        }
        return plan._instance_item(raw, pools, wanted, [])
    raw = {"project": record["project"], "name": record["name"]}
    raw["content_type"] = record["content_type"]
    driver = pools[record["pool"]]
    users = record["users"]
    return plan._volume_item(raw, record["pool"], driver, record["snapshots"], users, wanted, [])


def of_case(case: dict[str, Any]) -> BackupOf:
    record = case["record"]
    pool = record["pool"] if record["kind"] == "volume" else ""
    return BackupOf(record["kind"], record["project"], record["name"], pool)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_reader_and_mode_chosen(name: str) -> None:
    case = CASES[name]
    item = item_of(case)
    assert item.reader == case["reader"] == layout.EXPORT
    assert item.mode == case["mode"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_calls_made_and_the_stream_read(served: Any, name: str) -> None:
    case = CASES[name]
    incus, fake = served(case, running=2)
    of = of_case(case)
    operation = incus.start_backup(of, BACKUP, "2026-12-08T09:50:43Z")
    assert operation == CREATED
    waits = 0
    while not incus.wait_operation(operation, 1.0):
        waits += 1
    assert waits == 2
    with incus.export_backup(of, BACKUP) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        members = [[m.name, "dir" if m.isdir() else "file"] for m in tar]
    assert members == case["members"]
    incus.delete_backup(of, BACKUP)
    method, path, body = fake.calls[0]
    assert (method, path) == ("POST", case["backups"])
    assert body == {
        "name": BACKUP,
        "expires_at": "2026-12-08T09:50:43Z",
        "compression_algorithm": "none",
        "optimized_storage": False,
        **case["body"],
    }
    base, _, query = case["backups"].partition("?")
    assert fake.requests[-3:] == [
        ("GET", f"{base}/{BACKUP}/export?{query}"),
        ("DELETE", f"{base}/{BACKUP}?{query}"),
        ("GET", f"{REMOVED}/wait"),
    ]
    assert not fake.held


def quiescer(incus: Incus, tmp_path: Path) -> tuple[Quiescer, Journal]:
    journal = Journal(tmp_path / "staging")
    journal.begin("backup", "run")
    return Quiescer(incus, IncusSettings(), journal, Warnings()), journal


@pytest.mark.parametrize("name", ["zfs-container", "vm-on-zfs", "ceph-block-volume"])
def test_a_backup_incus_fails_to_make_is_deleted(served: Any, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    incus, fake = served(case, outcome="failed")
    q, journal = quiescer(incus, tmp_path)
    step, operation = q.backup(of_case(case), BACKUP, "2026-12-08T09:50:43Z")
    assert [s["op"] for s in journal.steps()] == ["delete_backup"]  # recorded before it is made
    with pytest.raises(UserError, match="no space left on device"):
        incus.wait_operation(operation, 1.0)
    q.release(step)
    assert ("DELETE", f"{case['backups'].partition('?')[0]}/{BACKUP}?"
            f"{case['backups'].partition('?')[2]}") in fake.requests  # fmt: skip
    assert not journal.steps() and not fake.held


@pytest.mark.parametrize("held", [True, False])
def test_the_next_run_deletes_what_a_killed_run_left(
    served: Any, tmp_path: Path, held: bool
) -> None:
    """A run killed after asking for the backup: the next run finds the journalled step and
    deletes the backup (already gone: nothing to do, the step is cleared all the same)."""
    case = CASES["lvm-container"]
    incus, fake = served(case, held=held)
    q, _ = quiescer(incus, tmp_path)
    q.backup(of_case(case), BACKUP, "2026-12-08T09:50:43Z")
    q2 = Quiescer(incus, IncusSettings(), Journal(tmp_path / "staging"), Warnings())
    left = q2.undo_all(Warnings())
    assert left == []
    assert not Journal(tmp_path / "staging").steps()
    assert ("GET", "/1.0/operations?recursion=1&all-projects=true") in [
        (m, p) for m, p, _ in fake.calls
    ]  # what Incus may still do on it is waited for first
    assert not fake.held


def test_an_unreachable_backup_endpoint_leaves_nothing_journalled(
    served: Any, tmp_path: Path
) -> None:
    case = dict(CASES["vm-on-dir"], backups="/1.0/instances/other/backups?project=default")
    incus, _ = served(case)
    q, journal = quiescer(incus, tmp_path)
    with pytest.raises(UserError):
        q.backup(BackupOf("instance", "default", "v2"), BACKUP, "2026-12-08T09:50:43Z")
    assert not journal.steps()
