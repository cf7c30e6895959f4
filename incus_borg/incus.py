"""The only code that speaks to Incus: its REST API over the daemon's unix socket, as named
methods, and the few `incus` client commands that have no plain API call (import, SQL dumps,
exec, waitready).

Every API path is built here; callers pass names, never URLs. Names are quoted the same way
everywhere, and the `used_by` URLs the API returns are parsed in one helper.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from . import profile
from .errors import UserError
from .host.processes import run_to_end

DEFAULT_TIMEOUT = 120.0
OPERATION_TIMEOUT = 600  # seconds an asynchronous operation (snapshot, state change) may take
UNREACHABLE_SIGNS = ("connect: no such file", "connection refused", "unix.socket: connect")
# Entity kinds whose lists are per project; the others are server-wide.
# The types of the volumes that hold instances (their snapshots are the instances').
INSTANCE_VOLUME_TYPES = {"container", "virtual-machine"}
PROJECT_KINDS = {"instances", "profiles", "networks", "network-acls", "network-zones", "images"}


def _segment(name: str) -> str:
    """One path segment, quoted (a name may hold characters a URL path may not)."""
    return quote(name, safe="")


def api_path(
    *segments: str, project: str | None = None, target: str | None = None, **params: str
) -> str:
    """`/1.0/<segments...>?project=...&target=...&<params>`, every segment quoted; `target`
    names the cluster member a request is about (None: none, or the one that answers)."""
    path = "/".join(["/1.0", *(_segment(s) for s in segments)])
    if target is not None:
        params = {"target": target, **params}
    if project is not None:
        params = {"project": project, **params}
    return f"{path}?{urlencode(params)}" if params else path


def parse_url(url: str) -> tuple[list[str], str]:
    """An API URL (as in `used_by` or a collection listing) -> its segments after `/1.0/`
    (unquoted) and its project (`default` when none is named)."""
    parts = urlsplit(url)
    segments = [unquote(s) for s in parts.path.removeprefix("/1.0/").split("/") if s]
    project = parse_qs(parts.query).get("project", ["default"])[0]
    return segments, project


def names_of(urls: Iterable[str]) -> list[str]:
    """The last segment of each URL of a collection listing."""
    return [parse_url(url)[0][-1] for url in urls]


def instances_using(used_by: Iterable[str]) -> list[tuple[str, str]]:
    """(project, name) of the instances among a `used_by` list."""
    found = []
    for url in used_by:
        segments, project = parse_url(url)
        if len(segments) == 2 and segments[0] == "instances":
            found.append((project, segments[1]))
    return found


@dataclass(frozen=True)
class BackupOf:
    """What an Incus backup (export) is made of: an instance, or a custom volume of a pool."""

    kind: str  # "instance" or "volume"
    project: str
    name: str
    pool: str = ""

    def segments(self) -> tuple[str, ...]:
        """Its API path, below /1.0."""
        if self.kind == "instance":
            return ("instances", self.name)
        return ("storage-pools", self.pool, "volumes", "custom", self.name)

    @property
    def resource(self) -> str:
        """The kind of resource operations on it name (see `Incus.settle`)."""
        return "instances" if self.kind == "instance" else "storage_volumes"


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket."""

    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("incus", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Incus:
    """One Incus server, reached through the unix socket in its directory."""

    def __init__(self, directory: str | Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.dir = Path(directory)
        self.timeout = timeout

    @property
    def socket(self) -> Path:
        """The daemon's unix socket."""
        return self.dir / "unix.socket"

    # --- the transport ---------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> Any:
        """One API call; an asynchronous operation is waited for. Returns the metadata."""
        with profile.phase(f"incus API {method}"):
            answer = self._exchange(method, path, body, timeout or self.timeout)
            if answer.get("type") == "error":
                raise self._api_error(method, path, str(answer.get("error", "")))
            if answer.get("type") == "async":
                return self._wait(method, path, str(answer["operation"]))
            return answer.get("metadata")

    def _exchange(self, method: str, path: str, body: Any, timeout: float) -> dict[str, Any]:
        raw = self._send(method, path, body, timeout)
        try:
            answer: dict[str, Any] = json.loads(raw)
        except ValueError:
            raise UserError(f"Incus answered {method} {path} with something not JSON") from None
        return answer

    def _send(self, method: str, path: str, body: Any, timeout: float) -> bytes:
        """One HTTP exchange; returns the raw answer."""
        conn = _UnixConnection(self.socket, timeout)
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            conn.request(method, path, body=data, headers=headers)
            raw = conn.getresponse().read()
        except (FileNotFoundError, ConnectionRefusedError):
            raise self.unreachable() from None
        except TimeoutError:
            raise UserError(
                f"Incus at {self.socket} did not answer {method} {path.split('?')[0]} within "
                f"{timeout:.0f} s"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise UserError(f"Incus at {self.socket}: {method} {path}: {exc}") from None
        finally:
            conn.close()
        return raw

    def _wait(self, method: str, path: str, operation: str) -> Any:
        segments, _ = parse_url(operation)
        waiting = api_path(*segments, "wait", timeout=str(OPERATION_TIMEOUT))
        done = self._exchange("GET", waiting, None, OPERATION_TIMEOUT + 30)
        if done.get("type") == "error":
            raise self._api_error(method, path, str(done.get("error", "")))
        meta = done.get("metadata") or {}
        if meta.get("status_code") != 200:
            raise self._api_error(method, path, str(meta.get("err") or meta.get("status")))
        return meta.get("metadata")

    @contextmanager
    def stream(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> Iterator[IO[bytes]]:
        """An API call whose answer is a byte stream (a backup's export), read as it comes;
        an error answer (JSON) becomes a UserError."""
        conn = _UnixConnection(self.socket, timeout or self.timeout)
        data = None if body is None else json.dumps(body)
        headers = {"Accept": "application/octet-stream"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            try:
                conn.request(method, path, body=data, headers=headers)
                answer = conn.getresponse()
            except (FileNotFoundError, ConnectionRefusedError):
                raise self.unreachable() from None
            except (OSError, http.client.HTTPException) as exc:
                raise UserError(f"Incus at {self.socket}: {method} {path}: {exc}") from None
            if answer.status != 200 or "json" in (answer.getheader("Content-Type") or ""):
                raw = answer.read()
                try:
                    message = str(json.loads(raw).get("error") or f"HTTP {answer.status}")
                except ValueError:
                    message = f"HTTP {answer.status}"
                raise self._api_error(method, path, message)
            yield answer
        finally:
            conn.close()

    def unreachable(self) -> UserError:
        """The error for a daemon that does not answer."""
        return UserError(f"Incus is not reachable at {self.socket}: is incusd running?")

    @staticmethod
    def _api_error(method: str, path: str, message: str) -> UserError:
        what = path.split("?")[0].removeprefix("/1.0/")
        return UserError(f"Incus refused {method} {what}: {message}")

    def _get(
        self, *segments: str, project: str | None = None, target: str | None = None, **params: str
    ) -> Any:
        return self.request("GET", api_path(*segments, project=project, target=target, **params))

    def _list(self, kind: str, project: str | None = None, recursion: str = "1") -> Any:
        """A collection, of one project or (kinds that have projects, `project` None) of all."""
        if kind in PROJECT_KINDS and project is None:
            return self._get(kind, recursion=recursion, **{"all-projects": "true"})
        return self._get(kind, project=project, recursion=recursion)

    # --- the server ------------------------------------------------------------------------

    def server(self) -> dict[str, Any]:
        """GET /1.0: the server's configuration and environment."""
        return dict(self._get())

    def version(self) -> str:
        """The daemon's version."""
        return str(self.server()["environment"].get("server_version", ""))

    def reachable(self) -> bool:
        """Whether the daemon answers on its socket."""
        try:
            self.request("GET", api_path(), timeout=10)
        except UserError:
            return False
        return True

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until the daemon has started and answers."""
        self.run(["admin", "waitready", "--timeout", str(int(timeout))], timeout=timeout + 10)

    def shutdown(self, timeout: int = 60) -> None:
        """`incus admin shutdown`: stop the instances, then the daemon."""
        self.run(["admin", "shutdown", "--timeout", str(timeout)], timeout=timeout * 2)

    def sql_dump(self, scope: str) -> str:
        """`incus admin sql local|global .dump`: the database as SQL text."""
        return self.run(["admin", "sql", scope, ".dump"])

    # --- the cluster -----------------------------------------------------------------------

    def cluster(self) -> dict[str, Any]:
        """GET /1.0/cluster: whether the server is clustered, and this member's name."""
        return dict(self._get("cluster"))

    def member(self) -> str | None:
        """This cluster member's name; None when the server is not clustered."""
        cluster = self.cluster()
        return str(cluster["server_name"]) if cluster.get("enabled") else None

    def cluster_members(self) -> list[dict[str, Any]]:
        """Every cluster member, with its status and roles."""
        return list(self._get("cluster", "members", recursion="1"))

    def cluster_groups(self) -> list[dict[str, Any]]:
        """Every cluster group, with its members."""
        return list(self._get("cluster", "groups", recursion="1"))

    def member_answers(self, name: str, timeout: float = 30) -> str | None:
        """Ask member `name` for its server record (forwarded by this member): None when it
        answers, else why it does not."""
        try:
            self.request("GET", api_path(target=name), timeout=timeout)
        except UserError as exc:
            return str(exc).rpartition(": ")[2] or str(exc)
        return None

    # --- entities --------------------------------------------------------------------------

    def entities(self, kind: str, project: str | None = None) -> list[dict[str, Any]]:
        """Every entity of a kind (projects, profiles, networks, network-acls, network-zones,
        storage-pools, instances, images), in one project or in all."""
        return list(self._list(kind, project))

    def entity_names(self, kind: str, project: str | None) -> set[str]:
        """Names of the entities of a kind in a project (kinds without projects: None)."""
        return set(names_of(self._get(kind, project=project)))

    def entity(
        self, kind: str, project: str | None, name: str, target: str | None = None
    ) -> dict[str, Any]:
        """One entity; a network's or pool's with the config of cluster member `target`
        (its member-specific keys, such as a pool's `source`, show only then)."""
        return dict(self._get(kind, name, project=project, target=target))

    def create_entity(
        self, kind: str, project: str | None, body: dict[str, Any], target: str | None = None
    ) -> None:
        """Create a project, pool, network or profile; with `target`, a network or pool
        pending on that cluster member (created everywhere once created without target)."""
        self.request("POST", api_path(kind, project=project, target=target), body)

    def update_entity(
        self,
        kind: str,
        project: str | None,
        name: str,
        body: dict[str, Any],
        target: str | None = None,
    ) -> None:
        """Replace a project's, pool's, network's or profile's writable fields (with
        `target`, a network's or pool's config on that cluster member)."""
        self.request("PUT", api_path(kind, name, project=project, target=target), body)

    def delete_entity(self, kind: str, project: str | None, name: str) -> None:
        """Delete a pool, network or profile (a pool or network still pending on cluster members
        too)."""
        self.request("DELETE", api_path(kind, name, project=project))

    def project(self, name: str) -> dict[str, Any]:
        """One project."""
        return dict(self._get("projects", name))

    def delete_project(self, name: str) -> None:
        """Delete an (empty) project."""
        self.request("DELETE", api_path("projects", name))

    def instances(self, project: str | None = None, recursion: str = "2") -> list[dict[str, Any]]:
        """Instances with their state and snapshots (recursion 2), in a project or all."""
        return list(self._list("instances", project, recursion))

    # --- storage ---------------------------------------------------------------------------

    def pools(self) -> list[dict[str, Any]]:
        """Every storage pool."""
        return list(self._get("storage-pools", recursion="1") or [])  # null when there is none

    def pool(self, name: str) -> dict[str, Any]:
        """One storage pool."""
        return dict(self._get("storage-pools", name))

    def custom_volumes(self, pool: str, project: str | None = None) -> list[dict[str, Any]]:
        """A pool's custom volumes (and their snapshots, named `vol/snap`), in a project or
        all."""
        segments = ("storage-pools", pool, "volumes", "custom")
        if project is None:
            return list(self._get(*segments, recursion="1", **{"all-projects": "true"}))
        return list(self._get(*segments, project=project, recursion="1"))

    def instances_with_snapshots(self, pool: str) -> set[tuple[str, str]]:
        """(project, name) of the instances with a root disk on `pool` that have snapshots:
        one listing of the pool's volumes, where a whole server's instances with their
        snapshots (recursion 2) take Incus a query of every running instance's state."""
        segments = ("storage-pools", pool, "volumes")
        return {
            (vol.get("project") or "default", vol["name"].partition("/")[0])
            for vol in self._get(*segments, recursion="1", **{"all-projects": "true"}) or []
            if "/" in vol["name"] and vol.get("type") in INSTANCE_VOLUME_TYPES
        }

    # A volume of a pool local to each cluster member is named per member: volumes of one
    # name may lie on several members, and `target` says which one a call is about.

    def custom_volume_names(self, pool: str, project: str, target: str | None = None) -> set[str]:
        """Names of a pool's custom volumes in a project (snapshots left out); with `target`,
        only those on that cluster member."""
        segments = ("storage-pools", pool, "volumes", "custom")
        if target is None:
            return {n for n in names_of(self._get(*segments, project=project)) if "/" not in n}
        volumes = self._get(*segments, project=project, recursion="1")
        here = (target, "")  # a volume of a pool shared by all members has no location
        return {v["name"] for v in volumes if "/" not in v["name"] and v["location"] in here}

    def custom_volume(
        self, pool: str, project: str, name: str, target: str | None = None
    ) -> dict[str, Any]:
        """One custom volume."""
        segments = ("storage-pools", pool, "volumes", "custom", name)
        return dict(self._get(*segments, project=project, target=target))

    def create_custom_volume(self, pool: str, project: str, name: str, content_type: str) -> None:
        """Create an empty custom volume (`filesystem` or `block`)."""
        segments = ("storage-pools", pool, "volumes", "custom")
        body = {"name": name, "type": "custom", "content_type": content_type}
        self.request("POST", api_path(*segments, project=project), body)

    def delete_custom_volume(self, pool: str, project: str, name: str) -> None:
        """Delete a custom volume (with its snapshots)."""
        segments = ("storage-pools", pool, "volumes", "custom", name)
        self.request("DELETE", api_path(*segments, project=project))

    def volume_snapshot_records(
        self, pool: str, project: str, name: str, target: str | None = None
    ) -> list[dict[str, Any]]:
        """A custom volume's snapshots, in full."""
        segments = ("storage-pools", pool, "volumes", "custom", name, "snapshots")
        return list(self._get(*segments, project=project, target=target, recursion="1"))

    def volume_snapshots(
        self, pool: str, project: str, name: str, target: str | None = None
    ) -> list[str]:
        """Names of a custom volume's snapshots, oldest first."""
        segments = ("storage-pools", pool, "volumes", "custom", name, "snapshots")
        return names_of(self._get(*segments, project=project, target=target))

    def create_volume_snapshot(
        self, pool: str, project: str, name: str, snap: str, target: str | None = None
    ) -> None:
        """Take a snapshot of a custom volume."""
        segments = ("storage-pools", pool, "volumes", "custom", name, "snapshots")
        self.request("POST", api_path(*segments, project=project, target=target), {"name": snap})

    def delete_volume_snapshot(
        self, pool: str, project: str, name: str, snap: str, target: str | None = None
    ) -> None:
        """Delete one snapshot of a custom volume."""
        segments = ("storage-pools", pool, "volumes", "custom", name, "snapshots", snap)
        self.request("DELETE", api_path(*segments, project=project, target=target))

    def image_volumes(self, pool: str) -> list[dict[str, Any]]:
        """A pool's image volumes (unpacked images that instances are cloned from)."""
        segments = ("storage-pools", pool, "volumes", "image")
        return list(self._get(*segments, recursion="1", **{"all-projects": "true"}))

    def delete_image_volume(self, pool: str, project: str | None, name: str) -> None:
        """Forget an image volume (Incus unpacks the image again when it is next used)."""
        path = api_path("storage-pools", pool, "volumes", "image", name, project=project)
        self.request("DELETE", path)

    # --- instances -------------------------------------------------------------------------

    def instance(self, project: str, name: str, recursion: str = "0") -> dict[str, Any]:
        """One instance (with its state and snapshots at recursion 1)."""
        return dict(self._get("instances", name, project=project, recursion=recursion))

    def instance_status(self, project: str, name: str) -> str:
        """Running, Stopped or Frozen."""
        return str(self._get("instances", name, "state", project=project)["status"])

    def change_state(self, project: str, name: str, action: str, timeout: int = 60) -> None:
        """freeze, unfreeze, stop or start an instance (stop waits `timeout` s, then forces)."""
        data: dict[str, Any] = {"action": action}
        if action == "stop":
            data |= {"timeout": timeout, "force": False}
        self.request("PUT", api_path("instances", name, "state", project=project), data)

    def update_instance(self, project: str, name: str, body: dict[str, Any]) -> None:
        """Replace an instance's writable fields."""
        self.request("PUT", api_path("instances", name, project=project), body)

    def instance_busy(self, project: str, name: str) -> bool:
        """Whether a running operation works on instance `project/name` (such as an import
        that goes on after its client was killed)."""
        return bool(self._operations_on("instances", project, name))

    def settle(self, kind: str, project: str, name: str, timeout: int = 120) -> None:
        """Wait until no running operation works on the instance (`kind` "instances") or
        custom volume ("storage_volumes") named `name`: a request a dead run sent (a freeze,
        a snapshot) may still be under way, and would take effect after it is undone."""
        for operation in self._operations_on(kind, project, name):
            waiting = api_path("operations", operation, "wait", timeout=str(timeout))
            self._exchange("GET", waiting, None, timeout + 30)

    def _operations_on(self, kind: str, project: str, name: str) -> list[str]:
        """The ids of the running operations whose resources of `kind` name `name`."""
        operations = self._get("operations", recursion="1", **{"all-projects": "true"}) or {}
        found = []
        for operation in operations.get("running") or []:
            if operation.get("class") == "websocket" or "command" in operation.get(
                "description", ""
            ):
                continue  # a command running inside (exec): ended on its own terms, not awaited
            for url in (operation.get("resources") or {}).get(kind) or []:
                segments, of_project = parse_url(url)
                if segments and segments[-1] == name and of_project == project:
                    found.append(str(operation["id"]))
                    break
        return found

    def rename_instance(self, project: str, name: str, new: str) -> None:
        """Rename a stopped instance (with its snapshots and volumes)."""
        self.request("POST", api_path("instances", name, project=project), {"name": new})

    def delete_instance(self, project: str, name: str) -> None:
        """Delete an instance, stopping it first (forcibly) when it runs."""
        if self.instance_status(project, name) != "Stopped":
            path = api_path("instances", name, "state", project=project)
            self.request("PUT", path, {"action": "stop", "force": True})
        self.request("DELETE", api_path("instances", name, project=project))

    def instance_snapshots(self, project: str, name: str) -> list[str]:
        """Names of an instance's snapshots, oldest first (in Incus's own order: that of the
        instance's records, as an instance listed with recursion 2 gives them)."""
        listed = self._get("instances", name, "snapshots", project=project, recursion="1")
        return [str(snap["name"]).rpartition("/")[2] for snap in listed or []]

    def create_instance_snapshot(self, project: str, name: str, snap: str) -> None:
        """Take a (stateless) snapshot of an instance."""
        path = api_path("instances", name, "snapshots", project=project)
        self.request("POST", path, {"name": snap, "stateful": False})

    def delete_instance_snapshot(self, project: str, name: str, snap: str) -> None:
        """Delete one snapshot of an instance."""
        self.request("DELETE", api_path("instances", name, "snapshots", snap, project=project))

    def move_instance(self, project: str, name: str, target: str) -> None:
        """Move a stopped instance (with its snapshots) to cluster member `target`."""
        path = api_path("instances", name, project=project, target=target)
        self.request("POST", path, {"name": name, "migration": True}, timeout=OPERATION_TIMEOUT)

    # --- backups: Incus's own export stream --------------------------------------------------

    def extensions(self) -> set[str]:
        """The API extensions this server offers."""
        return set(self.server().get("api_extensions") or [])

    def start_backup(self, of: BackupOf, backup: str, expires_at: str) -> str:
        """Ask Incus to make a backup, uncompressed and not optimized (so that it restores
        onto any driver), with every snapshot; returns the operation to wait for."""
        body = {
            "name": backup,
            "expires_at": expires_at,
            "compression_algorithm": "none",
            "optimized_storage": False,
        }
        body |= {"instance_only": False} if of.kind == "instance" else {"volume_only": False}
        path = api_path(*of.segments(), "backups", project=of.project)
        answer = self._exchange("POST", path, body, self.timeout)
        if answer.get("type") == "error":
            raise self._api_error("POST", path, str(answer.get("error", "")))
        return str(answer["operation"])

    def wait_operation(self, operation: str, timeout: float) -> bool:
        """Wait up to `timeout` s for an operation: True once it succeeded, False while it
        runs; a failed operation raises."""
        segments, _ = parse_url(operation)
        limit = max(1, math.ceil(timeout))
        done = self._exchange(
            "GET", api_path(*segments, "wait", timeout=str(limit)), None, limit + 30
        )
        meta = done.get("metadata") or {}
        if done.get("type") == "error" or meta.get("status") == "Running":
            current = self._exchange("GET", api_path(*segments), None, self.timeout)
            if (current.get("metadata") or {}).get("status") == "Running":
                return False
            meta = current.get("metadata") or {}
        if meta.get("status_code") != 200:
            what = "/".join(segments)
            raise self._api_error("GET", what, str(meta.get("err") or meta.get("status")))
        return True

    def export_backup(self, of: BackupOf, backup: str) -> Any:
        """The stream of a backup Incus made (a context manager)."""
        path = api_path(*of.segments(), "backups", backup, "export", project=of.project)
        return self.stream("GET", path)

    def direct_backup(self, of: BackupOf) -> Any:
        """A backup streamed as Incus makes it, stored nowhere (`direct_backup`; a context
        manager)."""
        body = {"compression_algorithm": "none", "optimized_storage": False}
        body |= {"instance_only": False} if of.kind == "instance" else {"volume_only": False}
        path = api_path(*of.segments(), "backups", project=of.project)
        return self.stream("POST", path, body, timeout=OPERATION_TIMEOUT)

    def usage(self, of: BackupOf) -> int | None:
        """Bytes an instance's root volume or a custom volume uses, when its driver tells."""
        state = self._get(*of.segments(), "state", project=of.project) or {}
        if of.kind == "instance":
            state = ((state.get("disk") or {}).get("root")) or {}
        used = state.get("usage")
        return int(used) if used else None

    def backup_names(self, of: BackupOf) -> list[str]:
        """The backups Incus holds of an instance or volume."""
        return names_of(self._get(*of.segments(), "backups", project=of.project) or [])

    def delete_backup(self, of: BackupOf, backup: str) -> None:
        """Delete a backup Incus holds (nothing to do when it is gone)."""
        try:
            self.request("DELETE", api_path(*of.segments(), "backups", backup, project=of.project))
        except UserError:
            try:
                held = backup in self.backup_names(of)
            except UserError as listing:
                if "not found" not in str(listing).lower():
                    raise
                held = False  # the instance or volume is gone, and its backups with it
            if held:
                raise

    def import_instance(self, stream: IO[bytes], name: str, pool: str, project: str) -> None:
        """`incus import`: an instance from a backup tarball read from `stream`. On a cluster
        it lands on this member (Incus 6.0 has no target for it: see `move_instance`)."""
        args = ["import", "-", name, "--storage", pool, "--project", project]
        self.feed(args, stream)

    def import_volume(
        self, stream: IO[bytes], pool: str, name: str, project: str, target: str | None = None
    ) -> None:
        """`incus storage volume import`: a custom volume from a backup tarball (onto cluster
        member `target`, when given)."""
        args = ["storage", "volume", "import", pool, "/dev/stdin", name, "--project", project]
        self.feed(args + (["--target", target] if target else []), stream)

    # --- commands inside instances ---------------------------------------------------------

    def exec_start(
        self, project: str, name: str, command: Sequence[str], environment: dict[str, str]
    ) -> str:
        """Start `command` inside a running instance as `incus exec` does (with the instance's
        `environment.*` keys, then `environment`), without input, its output recorded.

        Returns the operation to wait for with `exec_wait`.
        """
        body = {
            "command": list(command),
            "environment": environment,
            "interactive": False,
            "wait-for-websocket": False,
            "record-output": True,
        }
        path = api_path("instances", name, "exec", project=project)
        answer = self._exchange("POST", path, body, self.timeout)
        if answer.get("type") == "error":
            raise self._api_error("POST", path, str(answer.get("error", "")))
        return str(answer["operation"])

    def exec_wait(
        self, project: str, name: str, operation: str, timeout: float
    ) -> tuple[int, str] | None:
        """Wait up to `timeout` s for a command `exec_start` started: its exit code and its
        stderr once it ended (its recorded output is then deleted), None while it runs."""
        segments, _ = parse_url(operation)
        limit = max(1, math.ceil(timeout))
        done = self._exchange(
            "GET", api_path(*segments, "wait", timeout=str(limit)), None, limit + 30
        )
        what = f"/1.0/instances/{name}/exec"
        if done.get("type") == "error":
            current = self._exchange("GET", api_path(*segments), None, self.timeout)
            if (current.get("metadata") or {}).get("status") == "Running":
                return None
            raise self._api_error("POST", what, str(done.get("error", "")))
        meta = done.get("metadata") or {}
        if meta.get("status_code") != 200:
            raise self._api_error("POST", what, str(meta.get("err") or meta.get("status")))
        result = meta.get("metadata") or {}
        logs = ("instances", name, "logs", "exec-output")
        outputs = {
            fd: api_path(*logs, url.rsplit("/", 1)[-1], project=project)
            for fd, url in (result.get("output") or {}).items()
        }
        stderr = self._send("GET", outputs["2"], None, self.timeout) if "2" in outputs else b""
        for path in outputs.values():
            self.request("DELETE", path)
        return int(result.get("return", -1)), stderr.decode("utf-8", "replace")

    # --- rebuilding a server (restore all): pools, network ACLs and zones --------------------

    def storage_drivers(self) -> set[str]:
        """The storage drivers this server can create pools with."""
        drivers = self.server()["environment"].get("storage_supported_drivers") or []
        return {str(d.get("Name") or d.get("name")) for d in drivers}  # 6.0 spells it "Name"

    def create_pool(self, body: dict[str, Any]) -> None:
        """Create a storage pool (name, driver, config, description)."""
        self.request("POST", api_path("storage-pools"), body)

    def create_network_zone(self, project: str, body: dict[str, Any]) -> None:
        """Create a network (DNS) zone in a project."""
        self.request("POST", api_path("network-zones", project=project), body)

    def create_network_acl(self, project: str, body: dict[str, Any]) -> None:
        """Create a network ACL in a project."""
        self.request("POST", api_path("network-acls", project=project), body)

    def update_network_acl(self, project: str, name: str, body: dict[str, Any]) -> None:
        """Replace a network ACL's rules, config and description."""
        self.request("PUT", api_path("network-acls", name, project=project), body)

    # --- the client and the daemon's service ------------------------------------------------

    def env(self) -> dict[str, str]:
        """The environment for every incus client call."""
        return {**os.environ, "INCUS_DIR": str(self.dir)}

    def run(
        self,
        args: Sequence[str],
        *,
        stdin: IO[bytes] | None = None,
        timeout: float | None = None,
    ) -> str:
        """Run `incus ARGS...` (reading `stdin` when given) and return its stdout; failures
        become one-line UserErrors."""
        limit = timeout or self.timeout
        missing = "the incus client is not installed: install the incus package"
        slow = f"`incus {' '.join(args[:3])}` did not finish within {limit:.0f} s"
        with profile.phase(f"incus client {args[1] if args[0] == '--quiet' else args[0]}"):
            done = self._execute(["incus", *args], stdin, limit, missing, slow)
        if done.returncode != 0:
            raise self._failure(args, done.stderr.decode("utf-8", "replace"))
        return done.stdout.decode("utf-8", "replace")

    def feed(self, args: Sequence[str], stdin: IO[bytes], timeout: float = 24 * 3600) -> None:
        """Run `incus ARGS...` reading a stream (such as a backup tarball) from `stdin`."""
        self.run(["--quiet", *args], stdin=stdin, timeout=timeout)

    def _execute(
        self, argv: list[str], stdin: IO[bytes] | None, timeout: float, missing: str, slow: str
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a command with this server's environment; a missing program or a timeout
        becomes a UserError with the given message."""
        try:
            return run_to_end(argv, stdin, self.env(), timeout)
        except FileNotFoundError:
            raise UserError(missing) from None
        except subprocess.TimeoutExpired:
            raise UserError(slow) from None

    def _failure(self, args: Sequence[str], stderr: str) -> UserError:
        """Turn a failed call's stderr into one line naming the cause."""
        text = stderr.strip()
        if any(sign in text.lower() for sign in UNREACHABLE_SIGNS) or not self.socket.exists():
            return self.unreachable()
        last = text.splitlines()[-1] if text else "no message"
        what = " ".join([a for a in args if not a.startswith("-")][:3])
        return UserError(f"`incus {what}` failed: {last.removeprefix('Error: ')}")

    def run_daemon_command(self, command: str, what: str, timeout: float = 120) -> float:
        """Run incus.stop_command or incus.start_command (split like a shell, run without one).

        Returns how long it took.
        """
        started = time.monotonic()
        missing = f"incus.{what} {command!r}: command not found; fix incus.{what}"
        slow = f"incus.{what} {command!r} did not finish within {timeout:.0f} s"
        done = self._execute(shlex.split(command), None, timeout, missing, slow)
        if done.returncode != 0:
            lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
            detail = (lines or [f"exit {done.returncode}"])[-1]
            raise UserError(f"incus.{what} {command!r} failed: {detail}")
        return time.monotonic() - started
