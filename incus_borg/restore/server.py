"""`incus-borg restore server`: the whole server back, the old directory kept aside.

Order: check the run, stop instances and the daemon, move the Incus directory aside,
extract the directory and database, put every volume back into its pool, restore
subuid/subgid, start Incus and verify. Any failure rolls back to the moved-aside directory.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .. import layout, mounts, signals
from ..config import Config
from ..context import Context
from ..errors import UserError
from ..incus import Incus
from ..manifest import Item
from .pools import Pool, lift
from .source import NEWEST_COMPLETE, Source, definitions, newest_complete, open_run
from .target import report


class ServerRestore:
    """One whole-server restore and its rollback."""

    def __init__(self, config: Config, source: Source) -> None:
        self.config = config
        self.source = source
        self.incus = Incus(config.incus.dir)
        self.dir = Path(config.incus.dir)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.old = self.dir.with_name(f"{self.dir.name}.incus-borg-old-{stamp}")
        self.failed = self.dir.with_name(f"{self.dir.name}.incus-borg-failed-{stamp}")
        self.host_files = {
            Path(config.incus.subuid): "subuid",
            Path(config.incus.subgid): "subgid",
        }
        self.stamp = stamp
        self.work = self.dir.with_name(f"{self.dir.name}.incus-borg-new-{stamp}")
        self.was_running = False  # the daemon answered when the restore began
        self.stopped: list[tuple[str, str]] = []  # (project, name) of instances it stopped
        self.replacing = False  # the daemon is down and the directory is being replaced
        self.moved = False  # the original directory is at self.old
        self.extracted = False  # self.dir is the restored directory
        self.pools: list[Pool] = []

    def check(self) -> None:
        """Refuse a run that cannot give back a working server."""
        manifest = self.source.manifest
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
        try:
            with signals.interruptible():
                self._stop()
                self._replace()
                self._start_and_verify()
        except BaseException as exc:
            with signals.shielded():
                self._roll_back(exc)
            raise
        if self.moved:
            report(
                f"the previous Incus directory is kept at {self.old}; remove it with `rm -rf {self.old}` once satisfied"
            )

    # --- steps -----------------------------------------------------------------------------

    def _stop(self) -> None:
        """Stop every instance, then the daemon (remembering what ran, for a rollback)."""
        if not self.incus.reachable():
            return
        self.was_running = True
        instances = self.incus.instances(recursion="1")
        for instance in instances:
            if instance["status"] != "Stopped":
                self.incus.change_state(instance["project"], instance["name"], "stop")
                self.stopped.append((instance["project"], instance["name"]))
                report(f"instance {instance['project']}/{instance['name']}: stopped")
        self.incus.run_daemon_command(self.config.incus.stop_command, "stop_command")
        if self.incus.reachable():
            raise UserError(
                "incus.stop_command returned but the daemon still answers: fix incus.stop_command"
            )
        report("daemon stopped")

    def _replace(self) -> None:
        self.replacing = True
        for point in mounts.mounts_below(self.dir):
            mounts.unmount(point)
        if self.dir.exists():
            os.rename(self.dir, self.old)
            self.moved = True
            report(f"moved {self.dir} aside to {self.old}")
        self.work.mkdir(mode=0o700)
        self.source.extract(None, [str(layout.INCUS), str(layout.DATABASE)], 0, self.work)
        os.rename(self.work / str(layout.INCUS), self.dir)
        self.extracted = True
        os.rename(self.work / str(layout.DATABASE), self.dir / "database")
        self.work.rmdir()
        report(f"extracted the Incus directory and its database into {self.dir}")
        manifest = self.source.manifest
        for pool in self.pools:
            if pool.driver not in layout.READABLE_DRIVERS:
                continue
            pool.prepare()
            for item in manifest.instances + manifest.volumes:
                if item.pool == pool.name:
                    self._put_back(pool, item)
            pool.release()
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
                os.rename(path, path.with_name(f"{path.name}.incus-borg-old-{self.stamp}"))
            path.write_bytes(content)
            report(f"{path} restored (the previous one kept beside it)")

    def _start_and_verify(self) -> None:
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

    def _roll_back(self, cause: BaseException) -> None:
        """Put the original directory back and bring Incus and its instances up as they were."""
        report(f"restore failed ({cause}): rolling back")
        if self.replacing:
            if self.extracted:
                self._shut_down_restored()
            for point in mounts.mounts_below(self.dir):
                mounts.unmount(point)
            mounts.remove_tree(self.work)
            if self.extracted and self.dir.exists():
                os.rename(self.dir, self.failed)
                report(f"the failed restore is kept at {self.failed}")
            for path in self.host_files:
                kept = path.with_name(f"{path.name}.incus-borg-old-{self.stamp}")
                if kept.exists():
                    os.replace(kept, path)
            if self.moved:
                os.rename(self.old, self.dir)
                report(f"{self.dir} is back as it was")
        if self.was_running and not self.incus.reachable():
            self.incus.run_daemon_command(self.config.incus.start_command, "start_command")
            self.incus.wait_ready()
            report("daemon started again on the original directory")
        for project, name in self.stopped:
            try:
                self.incus.change_state(project, name, "start")
                report(f"instance {project}/{name}: started again")
            except UserError as exc:
                report(f"instance {project}/{name} could not be started again: {exc}")

    def _shut_down_restored(self) -> None:
        """Stop a daemon running on the restored directory, with the instances it started."""
        if not self.incus.reachable():
            return
        try:
            self.incus.shutdown(60)
        except UserError as exc:
            report(f"could not shut down the restored daemon: {exc}")
        try:
            self.incus.run_daemon_command(self.config.incus.stop_command, "stop_command")
        except UserError as exc:
            report(f"could not stop the daemon for the rollback: {exc}")


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

    archive: str
    yes: bool = False
    label: str | None = None


def run(ctx: Context, options: ServerOptions) -> None:
    """Restore the whole server from the run the options name."""
    require_confirmation(options.yes)
    source = open_run(ctx, options.archive, options.label, latest=NEWEST_COMPLETE)
    ServerRestore(ctx.config, source).run()
