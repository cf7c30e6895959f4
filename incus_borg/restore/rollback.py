"""A whole-server restore's plan, kept in the restore journal, and its rollback.

The plan (where the original directory goes, the work directory, the stage reached, the
instances stopped, the host files moved aside) is written before each step is taken. So a
restore that fails puts everything back from it, and one that was killed is put back by
`incus-borg restore server --roll-back`, which reads the same plan: the rollback looks at what
is on disk, so it may stop anywhere and run again.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DEFAULT_CONFIG_PATH, Config
from ..errors import UserError
from ..host import mounts
from ..incus import Incus
from .journal import SERVER, Entry, RestoreJournal, alive, when
from .target import report

# The steps of a server restore, in order; from "moving" on, the Incus directory is replaced.
STAGES = ("stopping", "moving", "extracting", "pools", "host-files", "starting")
REPLACING = STAGES[1:]
DOING = {
    "stopping": "stopping the instances and the daemon",
    "moving": "moving the Incus directory aside",
    "extracting": "extracting the Incus directory and database",
    "pools": "putting the volumes back into their pools",
    "host-files": "restoring subuid and subgid",
    "starting": "starting Incus on the restored directory",
}


@dataclass
class Plan:
    """What one server restore does, as recorded in the restore journal."""

    source: str  # the run restored from
    dir: str  # the Incus directory
    stamp: str  # names the directories beside it
    stage: str = STAGES[0]
    began: float = field(default_factory=time.time)
    had_original: bool = False  # an Incus directory existed when it was to be moved aside
    was_running: bool = False  # the daemon answered when the restore began
    stopped: list[list[str]] = field(default_factory=list)  # [project, name], before stopping
    kept: dict[str, str] = field(default_factory=dict)  # host file -> where it was moved aside

    @classmethod
    def from_entry(cls, entry: Entry) -> Plan:
        """The plan a journal entry holds."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in entry.items() if k in names})

    def beside(self, what: str) -> Path:
        """A directory beside the Incus directory: `<dir>.incus-borg-<what>-<stamp>`."""
        incus_dir = Path(self.dir)
        return incus_dir.with_name(f"{incus_dir.name}.incus-borg-{what}-{self.stamp}")

    @property
    def old(self) -> Path:
        """Where the original directory is moved aside."""
        return self.beside("old")

    @property
    def work(self) -> Path:
        """Where the run's directory and database are extracted first."""
        return self.beside("new")

    @property
    def failed(self) -> Path:
        """Where a rollback moves a half-restored directory."""
        return self.beside("failed")

    def restored_in_place(self) -> bool:
        """Whether whatever is at the Incus directory now comes from the restore (the
        original was moved aside, or there was none)."""
        if self.stage not in REPLACING:
            return False
        return not self.had_original or self.old.exists()


def roll_back(config: Config, plan: Plan, journal: RestoreJournal) -> None:
    """Put the original directory back and bring Incus and the instances up as they were;
    then forget the plan."""
    incus = Incus(plan.dir)
    if plan.stage in REPLACING:
        _put_directory_back(config, plan, incus)
    if plan.was_running and not incus.reachable():
        incus.run_daemon_command(config.incus.start_command, "start_command")
        incus.wait_ready()
        report("daemon started again on the original directory")
    for project, name in plan.stopped:
        try:
            incus.change_state(project, name, "start")
            report(f"instance {project}/{name}: started again")
        except UserError as exc:
            report(f"instance {project}/{name} could not be started again: {exc}")
    journal.clear(SERVER)


def _put_directory_back(config: Config, plan: Plan, incus: Incus) -> None:
    """The half-restored directory aside (with nothing mounted below it), the original back."""
    incus_dir = Path(plan.dir)
    restored = plan.restored_in_place()
    if restored:
        _shut_down_restored(config, incus)
        _unmount_below(incus_dir)
    _unmount_below(plan.work)
    mounts.remove_tree(plan.work)
    if restored and incus_dir.exists():
        failed = _unused(plan.failed)
        os.rename(incus_dir, failed)
        report(f"the failed restore is kept at {failed}")
    for path, kept in plan.kept.items():
        if Path(kept).exists():
            os.replace(kept, path)
    if plan.had_original and plan.old.exists():
        os.rename(plan.old, incus_dir)
        report(f"{incus_dir} is back as it was")


def _unmount_below(root: Path) -> None:
    for point in mounts.mounts_below(root):
        mounts.unmount(point)
    if mounts.mounts_below(root):
        raise UserError(f"{root} still has mounts below it: unmount them and roll back again")


def _unused(path: Path) -> Path:
    """`path`, or `path-N` when that exists already."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _shut_down_restored(config: Config, incus: Incus) -> None:
    """Stop a daemon running on the restored directory, with the instances it started."""
    if not incus.reachable():
        return
    try:
        incus.shutdown(60)
    except UserError as exc:
        report(f"could not shut down the restored daemon: {exc}")
    try:
        incus.run_daemon_command(config.incus.stop_command, "stop_command")
    except UserError as exc:
        report(f"could not stop the daemon for the rollback: {exc}")


def rollback_command(config_path: Path | None) -> str:
    """The exact command that rolls back a killed server restore."""
    named = config_path is not None and config_path.resolve() != DEFAULT_CONFIG_PATH
    option = f"-c {shlex.quote(str(config_path.resolve()))} " if named and config_path else ""
    return f"incus-borg {option}restore server --roll-back"


def pending(journal: RestoreJournal) -> Plan | None:
    """The plan of a server restore that did not finish, refused while it still runs."""
    entry = journal.read(SERVER)
    if entry is None:
        return None
    if alive(entry):
        raise UserError(
            f"a restore server (pid {entry['pid']}) is under way: wait for it to finish"
        )
    return Plan.from_entry(entry)


def refuse_pending_server(journal: RestoreJournal, config_path: Path | None) -> None:
    """Refuse to go on after a killed server restore, naming the original directory and the
    command that puts it back."""
    plan = pending(journal)
    if plan is None:
        return
    by_hand = ""
    if not plan.restored_in_place():
        where = f"the Incus directory {plan.dir} was not moved"
    elif plan.had_original:
        where = f"the original Incus directory is {plan.old} ({plan.dir} is half-restored)"
        by_hand = (
            f"; by hand: stop Incus, `mv {plan.dir} {plan.failed} && mv {plan.old} {plan.dir}`, "
            "start Incus and the instances"
        )
    else:
        where = f"{plan.dir} is half-restored (there was no Incus directory before)"
    stopped = f" and the {len(plan.stopped)} instance(s) it stopped" if plan.stopped else ""
    raise UserError(
        f"a restore server from {plan.source} (begun {when(plan.began)}) was killed while "
        f"{DOING[plan.stage]}: {where}; put it back with `{rollback_command(config_path)}` "
        f"(it moves a half-restored directory aside, puts the original back and starts Incus"
        f"{stopped}), then restore again{by_hand}"
    )
