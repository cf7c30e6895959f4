"""A real Incus cluster on this machine: private daemons on loopback addresses.

Each member is a `PrivateIncus` with its own INCUS_DIR, listening on 127.0.0.N (N = 2, 3, ...)
only. The first enables clustering; the others join with a preseed. Every member has a `dir`
pool and a btrfs pool on a loop file (`fast`), both with per-member config. All members share
the host's network namespace, so a managed bridge of one name cannot exist on each of them:
the network is a `macvlan` whose per-member `parent` is a host interface of that member's own
(an `ifb` device: this kernel has no `dummy` module), registered with the member's daemon so
that its teardown deletes it.

`Cluster.shutdown()` leaves nothing: every daemon is torn down by `PrivateIncus.shutdown`
(processes, mounts, loop devices, interfaces, directories).
"""

from __future__ import annotations

import logging
import random
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

import yaml

from .image import ALIAS, import_image
from .incusd import IncusError, PrivateIncus, interface_exists, wait_for
from .server import BTRFS_POOL, DEFAULT_POOL, SECOND_PROJECT, IncusServer

log = logging.getLogger(__name__)

NETWORK = "clnet"  # macvlan, parent per member
PROFILE = "clnic"  # a NIC on NETWORK
BTRFS_SIZE = "1GiB"
FIRST_HOST = 2  # members listen on 127.0.0.2, 127.0.0.3, ...
SPARE_HOSTS = 2  # addresses kept free for members that join later
PORT = 8443


def _free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def pick_port(hosts: list[str]) -> int:
    """A TCP port free on every one of `hosts` (8443 when it is)."""
    for port in [PORT, *random.sample(range(20000, 40000), 50)]:
        if all(_free(host, port) for host in hosts):
            return port
    raise RuntimeError(f"no TCP port free on all of {hosts}")


def unique_interface(prefix: str = "ibc") -> str:
    """A host interface name (at most 15 characters) not in use."""
    while True:
        name = f"{prefix}{random.randrange(16**8):08x}"
        if not interface_exists(name):
            return name


@dataclass
class Member:
    """One cluster member: its name, address, daemon and the parent of its macvlan."""

    name: str
    address: str  # host:port, loopback only
    daemon: PrivateIncus
    parent: str

    @property
    def server(self) -> IncusServer:
        """Helpers (exec, checksums, state) through this member's daemon."""
        return IncusServer(daemon=self.daemon, bridge=NETWORK)

    def incus(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """The incus client against this member."""
        return self.daemon.incus(*args, **kwargs)  # type: ignore[arg-type]


@dataclass
class Cluster:
    """A cluster of private daemons; `make_daemon` gives a fresh (not started) one."""

    make_daemon: Callable[[], PrivateIncus]
    members: list[Member] = field(default_factory=list)
    port: int = 0
    hosts: list[str] = field(default_factory=list)  # every address this cluster may use
    daemons: list[PrivateIncus] = field(default_factory=list)  # every one it started

    def member(self, name: str) -> Member:
        """The member called `name`."""
        return next(m for m in self.members if m.name == name)

    @property
    def first(self) -> Member:
        return self.members[0]

    def form(self, count: int) -> None:
        """Start `count` members, cluster them, and give them pools, a network, a project,
        a profile and the tiny image."""
        self.hosts = [f"127.0.0.{FIRST_HOST + i}" for i in range(count + SPARE_HOSTS)]
        self.port = pick_port(self.hosts)
        first = self._start("m1", self.hosts[0])
        first.incus("config", "set", "core.https_address", first.address)
        first.incus("cluster", "enable", first.name)
        self.members.append(first)
        for i in range(1, count):
            self.join(f"m{i + 1}", self.hosts[i])
        self._prepare()

    def _start(self, name: str, host: str) -> Member:
        daemon = self.make_daemon()
        self.daemons.append(daemon)
        parent = unique_interface()
        daemon.bridges.add(parent)  # registered first: teardown deletes it in any case
        subprocess.run(["ip", "link", "add", parent, "type", "ifb"], check=True)
        subprocess.run(["ip", "link", "set", parent, "up"], check=True)
        daemon.start()
        return Member(name, f"{host}:{self.port}", daemon, parent)

    def join(self, name: str, host: str) -> Member:
        """Start a fresh daemon and join it to the cluster as `name` on `host`, answering
        what the cluster asks of a new member: a macvlan network's `parent` (its own
        interface), a btrfs pool's `size`, and the defaults for the rest."""
        member = self._start(name, host)
        sponsor = next(m for m in self.members if m.daemon.running())
        token = sponsor.incus("cluster", "add", name).stdout.strip().splitlines()[-1]
        answers = {"parent": member.parent, "size": BTRFS_SIZE}
        asked = sponsor.daemon.query("/1.0/cluster")["member_config"]
        preseed = {
            "cluster": {
                "enabled": True,
                "server_name": name,
                "server_address": member.address,
                "cluster_address": sponsor.address,
                "cluster_token": token,
                "member_config": [
                    {
                        **{k: q[k] for k in ("entity", "name", "key")},
                        "value": answers.get(q["key"], ""),
                    }
                    for q in asked
                ],
            }
        }
        member.incus("admin", "init", "--preseed", input=yaml.safe_dump(preseed))
        self.members.append(member)
        return member

    def _prepare(self) -> None:
        """Pools and the network pending on each member, then created; project, profiles,
        image."""
        lines = []
        for member in self.members:
            on = f"--target {member.name}"
            lines += [
                f"storage create {DEFAULT_POOL} dir {on}",
                f"storage create {BTRFS_POOL} btrfs size={BTRFS_SIZE} {on}",
                f"network create {NETWORK} --type macvlan parent={member.parent} {on}",
            ]
        lines += [
            f"storage create {DEFAULT_POOL} dir",
            f"storage create {BTRFS_POOL} btrfs",
            f"network create {NETWORK} --type macvlan",
            f"profile device add default root disk path=/ pool={DEFAULT_POOL}",
            f"profile create {PROFILE}",
            f"profile device add {PROFILE} eth0 nic network={NETWORK} name=eth0",
            f"project create {SECOND_PROJECT} -c features.images=false -c features.profiles=false",
        ]
        for line in lines:
            self.first.incus(*line.split())
        import_image(self.first.daemon, self.first.daemon.root / "image-build")

    def launch(
        self,
        name: str,
        on: str,
        pool: str = DEFAULT_POOL,
        project: str = "default",
        profiles: tuple[str, ...] = ("default",),
        files: dict[str, bytes] | None = None,
    ) -> None:
        """Create container `name` from the tiny image on member `on`, write `files` into it
        and start it."""
        server = self.first.server
        chosen = [arg for p in profiles for arg in ("-p", p)]
        where = f"--target {on} --storage {pool} --project {project}"
        self.first.incus("init", ALIAS, name, *where.split(), *chosen)
        for path, content in (files or {}).items():
            server.push_file(name, path, content, project=project)
        server.start(name, project=project)

    def lose(self, name: str) -> None:
        """What losing a member looks like: its daemon gone (torn down) and the member
        forcibly removed from the cluster by another member."""
        lost = self.member(name)
        left = lost.daemon.shutdown()
        if left:
            raise RuntimeError(f"teardown of {name} left {left}")
        self.members.remove(lost)
        self.first.incus("cluster", "remove", name, "--force", "--yes")

    def wait_online(self, name: str, timeout: float = 60) -> None:
        """Wait until member `name` answers requests forwarded by the first member (a
        restarted member takes some seconds to be reachable through the cluster)."""

        def answers() -> bool:
            try:
                self.first.daemon.query(f"/1.0?target={name}")
            except IncusError:
                return False
            return True

        if not wait_for(answers, timeout, interval=0.5):
            raise TimeoutError(f"cluster member {name} does not answer after {timeout} s")

    def shutdown(self) -> list[str]:
        """Tear every daemon down; returns what was left.

        A member shut down after its peers has no quorum, and waits for it half a minute or
        more (also when all go at once). So the instances are stopped while the cluster is
        whole, then each daemon alone (SIGTERM), then what is left of each is cleaned up.
        """
        alive = [d for d in self.daemons if d.running()]
        if alive:
            self._stop_instances(alive[0])
        for daemon in alive:
            try:
                daemon.stop_daemon()
            except (OSError, TimeoutError):
                log.exception("could not stop the daemon in %s", daemon.root)
        self.members.clear()
        return [item for daemon in self.daemons for item in daemon.shutdown(revive=False)]

    @staticmethod
    def _stop_instances(daemon: PrivateIncus) -> None:
        """Stop every instance of the cluster, in every project (failures are logged)."""
        try:
            projects = [url.rsplit("/", 1)[-1] for url in daemon.query("/1.0/projects")]
        except (IncusError, subprocess.SubprocessError, ValueError):
            log.exception("cannot list the projects of the cluster")
            return
        for project in projects:
            done = daemon.incus("stop", "--all", "--force", "--project", project, check=False)
            if done.returncode:
                log.warning("stopping the instances of %s: %s", project, done.stderr.strip())
