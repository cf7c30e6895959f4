"""`incus-borg restore server`: the whole server back, the old directory kept aside.

Order: check the run, stop instances and the daemon, move the Incus directory aside,
extract the directory and database, put every volume back into its pool, restore
subuid/subgid, start Incus and verify. Each step is recorded in the restore journal before it
is taken (`rollback.Plan`): any failure rolls back to the moved-aside directory, and after a
killed restore every restore refuses, naming the original directory, until
`restore server --roll-back` puts it back.

A cluster member is never restored this way: its copy of the cluster's database is a raft
replica, useless alone. A lost member is replaced by a fresh member joined to the cluster,
which then gets the lost member's instances and volumes (`restore all --target NEW`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import layout
from ..config import Config
from ..context import Context
from ..errors import UserError
from ..host import mounts, signals, testpoints
from ..incus import Incus
from ..manifest import Item
from .journal import SERVER, RestoreJournal
from .pools import Pool, lift
from .rollback import Plan, pending, refuse_pending_server, roll_back
from .source import NEWEST_COMPLETE, Source, definitions, newest_complete, open_run
from .target import report


class ServerRestore:
    """One whole-server restore (undone by `rollback.roll_back` on any failure)."""

    def __init__(self, config: Config, source: Source, journal: RestoreJournal) -> None:
        self.config = config
        self.source = source
        self.journal = journal
        self.incus = Incus(config.incus.dir)
        self.dir = Path(config.incus.dir)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.plan = Plan(source.description, str(self.dir), stamp)
        self.host_files = {
            Path(config.incus.subuid): "subuid",
            Path(config.incus.subgid): "subgid",
        }
        self.pools: list[Pool] = []

    def check(self) -> None:
        """Refuse a run that cannot give back a working server."""
        manifest = self.source.manifest
        if manifest.member is not None:
            refuse_cluster(
                f"{self.source.description} was made by cluster member {manifest.member}"
            )
        if manifest.partial:
            newest = newest_complete(self.source)
            use = f"the newest is {newest}" if newest else "make one with `incus-borg backup`"
            raise UserError(
                f"{self.source.description} is a partial run (it holds only some instances), "
                f"which cannot give back a working server: restore server needs a complete "
                f"run; {use}"
            )
        if mounts.is_mounted(self.dir):
            raise UserError(
                f"{self.dir} is a mount point: restore server moves the Incus directory aside, "
                "which a mount point cannot be; mount that filesystem one level up (with the "
                "directory inside it) first"
            )
        if manifest.database != "exact":
            raise UserError(
                f"{self.source.description} holds SQL dumps only (quiesce_daemon was false): "
                "restore server needs a run with the database copied exactly"
            )
        if not self.source.read(f"{layout.DATABASE}/local.db"):  # a run read absent as empty
            raise UserError(f"{self.source.description} holds no database (database/local.db)")
        missing = [i.ref for i in self.source.missing(manifest.instances + manifest.volumes)]
        if missing:
            raise UserError(f"{self.source.description} lacks the data of {', '.join(missing)}")
        self.pools = [Pool(self.dir, d) for d in definitions(self.source, "storage-pools")]
        unsupported = [p.name for p in self.pools if p.driver not in layout.READABLE_DRIVERS]
        if unsupported:
            report(
                f"pools {', '.join(unsupported)} are not dir or btrfs: their volumes are not put "
                "back; restore them with `incus-borg restore instance|volume` once Incus is up"
            )

    def run(self) -> None:
        """Restore, or roll back and re-raise on any failure."""
        self.check()
        self._refuse_paused()
        try:
            with signals.interruptible():
                self._stop()
                self._replace()
                self._start_and_verify()
        except BaseException as exc:
            with signals.shielded():
                report(f"restore failed ({exc}): rolling back")
                roll_back(self.config, self.plan, self.journal)
            raise
        self.journal.clear(SERVER)
        if self.plan.had_original:
            report(
                f"the previous Incus directory is kept at {self.plan.old}; remove it with "
                f"`rm -rf {self.plan.old}` once satisfied"
            )

    def _record(self, stage: str | None = None) -> None:
        """Write the plan (at `stage`) to the journal before the step it describes."""
        self.plan.stage = stage or self.plan.stage
        self.journal.record(SERVER, self.plan.__dict__)

    def _refuse_paused(self) -> None:
        """Refuse paused instances up front: stopping one fails after its timeout and leaves
        it half-frozen; whether it may run again is the admin's call."""
        if not self.incus.reachable():
            return
        paused(self.incus.instances(recursion="1"))

    # --- steps -----------------------------------------------------------------------------

    def _stop(self) -> None:
        """Stop every instance, then the daemon (recording what ran first, for a rollback)."""
        if not self.incus.reachable():
            return
        self.plan.was_running = True
        self._record("stopping")
        instances = self.incus.instances(recursion="1")
        paused(instances)
        for instance in instances:
            if instance["status"] != "Stopped":
                self.plan.stopped.append([instance["project"], instance["name"]])
                self._record()
                self.incus.change_state(instance["project"], instance["name"], "stop")
                report(f"instance {instance['project']}/{instance['name']}: stopped")
        self.incus.run_daemon_command(self.config.incus.stop_command, "stop_command")
        if self.incus.reachable():
            raise UserError(
                "incus.stop_command returned but the daemon still answers: fix incus.stop_command"
            )
        report("daemon stopped")

    def _replace(self) -> None:
        self.plan.had_original = self.dir.exists()
        self._record("moving")
        for point in mounts.mounts_below(self.dir):
            mounts.unmount(point)
        if self.plan.had_original:
            os.rename(self.dir, self.plan.old)
            report(f"moved {self.dir} aside to {self.plan.old}")
        self._record("extracting")
        work = self.plan.work
        work.mkdir(mode=0o700)
        testpoints.reached("server-extracting")
        self.source.extract(None, [str(layout.INCUS), str(layout.DATABASE)], 0, work)
        os.rename(work / str(layout.INCUS), self.dir)
        os.rename(work / str(layout.DATABASE), self.dir / "database")
        work.rmdir()
        report(f"extracted the Incus directory and its database into {self.dir}")
        self._record("pools")
        manifest = self.source.manifest
        for pool in self.pools:
            if pool.driver not in layout.READABLE_DRIVERS:
                continue
            pool.prepare()
            for item in manifest.instances + manifest.volumes:
                if item.pool == pool.name:
                    self._put_back(pool, item)
            pool.release()
        self._record("host-files")
        self._restore_host_files()

    def _put_back(self, pool: Pool, item: Item) -> None:
        """Extract one instance or volume (and its snapshots) into its pool."""
        backup = f"{item.path}/backup"
        strip = len(Path(backup).parts)
        args = (self.dir, pool.name, item.project, item.name, item.snapshots)
        if item.kind == "instance":
            members = layout.instance_places(*args)
        else:
            members = layout.volume_places(*args, item.type == "block")
        for member, place in members.items():
            # A block volume's image file lies in the volume's directory.
            target = place.parent if place.name == "root.img" else place
            snap = member.partition("/")[2] or None
            pool.volume_dir(target)
            testpoints.reached("server-pools", item.ref)
            self.source.extract(item, [f"{backup}/{member}"], strip + member.count("/"), target)
            leaf = Path(member).name
            if leaf.endswith(".img"):
                os.rename(target / leaf, target / "root.img")
            else:
                lift(target, leaf)
            if snap:
                pool.seal_snapshot(target)
        report(f"{item.kind} {item.ref}: data put back into pool {pool.name}")

    def _restore_host_files(self) -> None:
        """subuid and subgid as backed up; one the run lacks (read as empty) is left alone."""
        for path, name in self.host_files.items():
            try:
                content = self.source.read(f"{layout.HOST}/{name}")
            except UserError:
                continue
            if not content:
                continue
            if path.exists():
                kept = path.with_name(f"{path.name}.incus-borg-old-{self.plan.stamp}")
                self.plan.kept[str(path)] = str(kept)
                self._record()
                os.rename(path, kept)
            path.write_bytes(content)
            report(f"{path} restored (the previous one kept beside it)")

    def _start_and_verify(self) -> None:
        self._record("starting")
        took = self.incus.run_daemon_command(self.config.incus.start_command, "start_command")
        self.incus.wait_ready()
        report(f"daemon started in {took:.1f} s")
        self._forget_image_volumes()
        manifest = self.source.manifest
        for item in manifest.instances:
            self.incus.instance(item.project, item.name)
        for item in manifest.volumes:
            self.incus.custom_volume(item.pool, item.project, item.name)
        for pool in self.pools:
            status = self.incus.pool(pool.name)["status"]
            if status != "Created":
                raise UserError(f"pool {pool.name} is {status} after the restore")
        report(
            f"server restored from {self.source.description}: {len(manifest.instances)} instance(s), "
            f"{len(manifest.volumes)} volume(s), {len(self.pools)} pool(s) known to Incus"
        )

    def _forget_image_volumes(self) -> None:
        """Drop the records of image volumes (the unpacked images a btrfs pool clones
        instances from): the run does not hold them, and Incus unpacks an image again into a
        fresh one the next time it is used."""
        for pool in self.pools:
            if pool.driver not in layout.READABLE_DRIVERS:
                continue
            for volume in self.incus.image_volumes(pool.name):
                self.incus.delete_image_volume(pool.name, volume.get("project"), volume["name"])
                report(f"pool {pool.name}: image volume {volume['name'][:12]} will be rebuilt")


def paused(instances: list[dict[str, Any]]) -> None:
    """Refuse when any of the instances is paused (Frozen), naming them and the fix."""
    frozen = [f"{i['project']}/{i['name']}" for i in instances if i["status"] == "Frozen"]
    if frozen:
        raise UserError(
            f"instance(s) {', '.join(frozen)} are paused: restore server would have to stop "
            "them, and a paused instance does not stop cleanly; resume each with "
            "`incus start --project P NAME` (or stop it with `incus stop --force --project P "
            "NAME`), then restore again"
        )


CLUSTER_GUIDANCE = (
    "restore server cannot rebuild a cluster member (one member's copy of the cluster's "
    "database is not valid alone): join a fresh member to the cluster, then run "
    "`incus-borg restore all ARCHIVE --target NEW` to give it the lost member's instances "
    "and volumes (docs/clusters.md: Replacing a lost member)"
)


def refuse_cluster(why: str) -> None:
    """Refuse a server restore of (or onto) a cluster member, naming the way that works."""
    raise UserError(f"{why}: {CLUSTER_GUIDANCE}")


def refuse_clustered(incus: Incus) -> None:
    """Refuse when this server is a cluster member (asked of its daemon, if it answers)."""
    try:
        member = incus.member()
    except UserError:
        return
    if member is not None:
        refuse_cluster(f"this server is cluster member {member}")


def require_confirmation(yes: bool) -> None:
    """Refuse to go on without --yes."""
    if not yes:
        raise UserError(
            "restore server replaces the whole Incus directory (the old one is moved aside): "
            "add --yes to go ahead"
        )


@dataclass
class ServerOptions:
    """What `restore server` was asked for."""

    archive: str | None
    yes: bool = False
    label: str | None = None
    roll_back: bool = False


def run(ctx: Context, options: ServerOptions) -> None:
    """Restore the whole server from the run the options name, or roll a killed one back."""
    journal = RestoreJournal.of(ctx.config)
    if options.roll_back:
        plan = pending(journal)
        if plan is None:
            raise UserError("no server restore to roll back: the restore journal holds none")
        roll_back(ctx.config, plan, journal)
        report(f"rolled back the restore from {plan.source}")
        return
    if options.archive is None:
        raise UserError("name the run to restore: restore server ARCHIVE --yes")
    refuse_clustered(ctx.incus())
    require_confirmation(options.yes)
    refuse_pending_server(journal, ctx.path)
    source = open_run(ctx, options.archive, options.label, latest=NEWEST_COMPLETE)
    ServerRestore(ctx.config, source, journal).run()
