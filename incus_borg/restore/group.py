"""`incus-borg restore group`: a consistency group's instances, all of them or none.

Every member is checked first, then built under its temporary name and verified, as
`restore instance` does (instance.py). Only once all of them are verified do they take their
names; if one fails, every member built so far is deleted again, and nothing is replaced.
With --replace, the members that exist are stopped and moved aside
(`NAME-replaced-XXXXXXXX`) just before the new ones take their names, then deleted; a
failure while they are swapped puts every original back.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import profile
from ..context import Context
from ..errors import UserError, Warnings
from ..host import signals
from ..host.parallel import side_by_side
from ..incus import Incus
from ..manifest import Group, Item, Manifest
from . import instance
from .instance import Built, InstanceOptions
from .journal import Entry, RestoreJournal, alive
from .rollback import refuse_pending_server
from .source import Latest, Source, open_run
from .target import report, require_member, start_and_wait

ASIDE = "-replaced-"  # between the name and the token of a replaced member's name


@dataclass
class GroupOptions:
    """What `restore group` was asked for."""

    name: str  # NAME or PROJECT/NAME
    pool: str | None = None
    project: str | None = None
    start: bool = False
    with_volumes: bool = False
    stream: bool = False
    pool_map: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    replace: bool = False  # replace the members that exist


def find_group(manifest: Manifest, name: str, description: str) -> Group:
    """The group `name` names in a run: by its whole name, or by the NAME of PROJECT/NAME
    when only one project has it."""
    found = _named(manifest, name)
    if len(found) > 1:
        names = ", ".join(g.name for g in found)
        raise UserError(f"group {name!r} is ambiguous in {description}: name one of {names}")
    if not found:
        held = ", ".join(g.name for g in manifest.groups) or "none"
        raise UserError(f"no group {name!r} in {description} (it holds: {held})")
    return found[0]


def _named(manifest: Manifest, name: str) -> list[Group]:
    """The run's groups `name` names: the one of that whole name, else those of that NAME."""
    exact = [g for g in manifest.groups if g.name == name]
    return exact or [g for g in manifest.groups if g.name.rpartition("/")[2] == name]


def members(manifest: Manifest, group: Group, description: str) -> list[Item]:
    """The group's instances the run holds; refuses a group with none, and one the run
    read without some of its members (restoring the others alone would bring back a set
    that never existed)."""
    held = [i for i in manifest.instances if i.group == group.name and i.failed is None]
    if not held:
        raise UserError(
            f"group {group.name} has no instance in {description} (every one was left out of "
            "the run): restore from another run"
        )
    if group.left_out:
        raise UserError(
            f"group {group.name} was read without {', '.join(group.left_out)} in "
            f"{description} (left out of that run): restore from another run (`incus-borg "
            "list`), or restore the others one by one with `restore instance`"
        )
    return held


def holding_group(name: str) -> Latest:
    """`latest` for a restore of group `name`: the newest run that holds all of it (a name
    that is ambiguous in a run is refused)."""

    def holds(manifest: Manifest) -> bool:
        if not _named(manifest, name):
            return False
        group = find_group(manifest, name, f"run {manifest.run}")
        try:
            members(manifest, group, "")
        except UserError:
            return False
        return True

    return Latest(holds=holds, what=f"group {name!r} whole")


def run(ctx: Context, archive: str, label: str | None, options: GroupOptions) -> int:
    """Restore the group the options name from ARCHIVE; the exit code."""
    journal = RestoreJournal.of(ctx.config)
    refuse_pending_server(journal, ctx.path)
    require_member(ctx.incus(), options.target)
    latest = holding_group(options.name)
    with profile.phase("open the run"):
        source = open_run(ctx, archive, label, latest=latest)
    return restore(ctx.incus(), source, options, journal)


def restore(incus: Incus, source: Source, options: GroupOptions, journal: RestoreJournal) -> int:
    """Build every member, verify each, then name them all (replacing those that exist,
    with --replace); returns the exit code."""
    group = find_group(source.manifest, options.name, source.description)
    items = members(source.manifest, group, source.description)
    wanted = [
        InstanceOptions(
            item.ref,
            pool=options.pool,
            project=options.project,
            with_volumes=options.with_volumes,
            stream=options.stream,
            pool_map=options.pool_map,
            target=options.target,
        )
        for item in items
    ]
    with profile.phase("preconditions"):
        targets = [
            instance.preconditions(incus, source, item, one, replacing=True)
            for item, one in zip(items, wanted, strict=True)
        ]
        _refuse_collisions(group, targets)
        _restore_each_volume_once(targets)
        existing = [t for t in targets if instance.exists(incus, t.project, t.name)]
    _refuse_protected(incus, group, existing if options.replace else [])
    if existing and not options.replace:
        names = ", ".join(f"{t.project}/{t.name}" for t in existing)
        raise UserError(
            f"group {group.name}: {names} already exist: add --replace to replace them once "
            "every member is restored and verified, or restore into another --project"
        )
    warnings = Warnings()
    _put_back_asides(incus, journal, warnings)
    built: list[Built] = []
    with signals.interruptible():
        for target, one in zip(targets, wanted, strict=True):
            instance.prepare(incus, source, target, one, journal, warnings)
        with instance.discarded_on_failure(incus, journal, built):
            for item, target in zip(items, targets, strict=True):
                with profile.phase(f"build {item.ref}"):
                    built.append(
                        instance.build(incus, source, item, target, options.stream, journal)
                    )
            _swap(incus, built, existing, journal)
    for made in built:
        instance.report_restored(made, source)
    report(
        f"group {group.name}: {len(built)} instance(s) restored together from "
        f"{source.description} (captured at {group.at or 'an unrecorded moment'})"
    )
    if options.start:
        _start_together(incus, built)
    else:
        report(f"group {group.name}: left stopped (use --start to start its members together)")
    return warnings.exit_code


def _refuse_protected(incus: Incus, group: Group, existing: list[instance.Target]) -> None:
    """Refuse, before anything is stopped, to replace a member Incus will not delete."""
    for target in existing:
        found = incus.instance(target.project, target.name)
        config = found.get("expanded_config") or found.get("config") or {}
        if str(config.get("security.protection.delete", "")).lower() == "true":
            raise UserError(
                f"group {group.name}: {target.project}/{target.name} has "
                "security.protection.delete=true, so it cannot be replaced: unset it "
                f"(`incus config unset --project {target.project} {target.name} "
                "security.protection.delete`), or restore into another --project"
            )


def _refuse_collisions(group: Group, targets: list[instance.Target]) -> None:
    """Refuse two members that would take one name (members of two projects restored into
    one with --project)."""
    seen: set[tuple[str, str]] = set()
    for target in targets:
        if (target.project, target.name) in seen:
            raise UserError(
                f"group {group.name}: two members would both be {target.project}/{target.name}: "
                "restore into their own projects (leave out --project)"
            )
        seen.add((target.project, target.name))


def _restore_each_volume_once(targets: list[instance.Target]) -> None:
    """A custom volume that several members use and that must be restored is restored with
    the first of them only."""
    seen: set[str] = set()
    for target in targets:
        mine = [v for v in target.volumes if f"{v.pool}/{v.ref}" not in seen]
        seen |= {f"{v.pool}/{v.ref}" for v in target.volumes}
        target.volumes = mine


def aside_key(project: str, name: str) -> str:
    """The restore journal's key of a member moved aside for its replacement."""
    return f"aside@{project}@{name}"


def _swap(
    incus: Incus, built: list[Built], existing: list[instance.Target], journal: RestoreJournal
) -> None:
    """Give every built member its name, the existing ones moved aside first (each
    journalled first: a restore killed meanwhile leaves them for the next one to put back);
    on a failure, the built ones go back to their temporary names and the originals to
    theirs."""
    asides: list[Entry] = []
    named: list[Built] = []
    try:
        for target in existing:
            running = incus.instance_status(target.project, target.name) == "Running"
            aside = f"{target.name[:40]}{ASIDE}{secrets.token_hex(4)}"
            entry: Entry = {"project": target.project, "name": target.name, "aside": aside}
            entry["running"] = running
            journal.record(aside_key(target.project, target.name), entry)
            asides.append(entry)
            if running:
                incus.change_state(target.project, target.name, "stop")
            incus.rename_instance(target.project, target.name, aside)
        for made in built:
            instance.take_name(incus, made)
            named.append(made)
    except BaseException:
        with signals.shielded():
            _undo_swap(incus, named, asides)
            for one in asides:
                journal.clear(aside_key(one["project"], one["name"]))
        raise
    for one in asides:
        project, aside = one["project"], one["aside"]
        try:
            incus.delete_instance(project, aside)
        except UserError as exc:
            report(f"instance {project}/{aside} (what {one['name']} was) is left: {exc}")
            continue
        journal.clear(aside_key(project, one["name"]))
        report(f"instance {project}/{one['name']}: the one it replaced is deleted")


def _undo_swap(incus: Incus, named: list[Built], asides: list[Entry]) -> None:
    """Put things back as they were before `_swap`, as far as Incus lets it."""
    for made in named:
        project, name = made.target.project, made.target.name
        _try(f"{project}/{name}", incus.rename_instance, project, name, made.temporary)
    for one in asides:
        _put_back(incus, one)


def _put_back(incus: Incus, one: Entry) -> None:
    """Give a member moved aside its name back (if it was moved), and start it if it ran."""
    project, name, aside = one["project"], one["name"], one["aside"]
    if instance.exists(incus, project, aside):
        _try(f"{project}/{name}", incus.rename_instance, project, aside, name)
    if one["running"] and instance.exists(incus, project, name):
        _try(f"{project}/{name}", incus.change_state, project, name, "start")


def _put_back_asides(incus: Incus, journal: RestoreJournal, warnings: Warnings) -> None:
    """Members a killed `restore group --replace` moved aside: each is given its name back
    when that name is free, else named with the command that removes it."""
    for key, entry in journal.entries("aside@").items():
        if alive(entry):
            continue
        project, name, aside = entry["project"], entry["name"], entry["aside"]
        if not instance.exists(incus, project, aside):
            journal.clear(key)
        elif instance.exists(incus, project, name):
            warnings.add(
                f"instance {project}/{aside} is what {project}/{name} was before a killed "
                f"`restore group --replace` replaced it: `incus delete --project {project} "
                f"{aside}` once the new one is right"
            )
        else:
            warnings.add(f"instance {project}/{name}: put back from {aside}, where a killed "
                         "`restore group --replace` had moved it")  # fmt: skip
            _put_back(incus, entry)
            journal.clear(key)


def _try(what: str, step: Callable[..., object], *args: str) -> None:
    """One step of putting things back; a failure is said, and the others still tried."""
    try:
        step(*args)
    except UserError as exc:
        report(f"could not put {what} back: {exc}")


def _start_together(incus: Incus, built: list[Built]) -> None:
    """Start every member at once, and wait until all of them run."""
    places = [(m.target.project, m.target.name) for m in built]
    outcomes = side_by_side(lambda place: start_and_wait(incus, *place), places)
    failed = [str(o) for o in outcomes if isinstance(o, BaseException)]
    if failed:
        raise UserError(f"restored, but not every member starts: {'; '.join(failed)}")
    report(f"members started together: {', '.join(m.target.name for m in built)}")
