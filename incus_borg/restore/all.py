"""`incus-borg restore all`: a whole run rebuilt onto an existing server through its API.

In dependency order: projects; storage pools that do not exist yet (mapped by --pool-map,
possibly onto another driver); network zones, ACLs and networks; profiles, their devices on
the mapped pools; custom volumes with their snapshots; every instance with its snapshots
(through `restore instance`). What exists is left alone and reported; --dry-run prints the
whole plan first. A failure stops with exit 2 naming what was created, so that running the
same command again continues. --start starts what was running at backup time, in
`boot.autostart.priority` order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from ..context import Context
from ..errors import UserError
from ..host import signals
from ..host.parallel import side_by_side
from ..incus import Incus
from ..manifest import Item
from . import graph, poolmap, rebuild
from .graph import Graph, Node
from .journal import RestoreJournal
from .poolmap import PoolMap
from .rebuild import COLLIDE, CREATE, EXISTS, UPDATE, Plan, here_node
from .rollback import refuse_pending_server
from .source import NEWEST_COMPLETE, Source, open_run
from .target import matching, report, require_member, start_and_wait


@dataclass
class AllOptions:
    """What `restore all` was asked for."""

    archive: str
    pool_map: tuple[str, ...] = ()  # OLD=NEW[:DRIVER[:key=value,...]]
    projects: tuple[str, ...] = ()
    dry_run: bool = False
    start: bool = False
    label: str | None = None
    target: str | None = None  # the cluster member to rebuild onto (default: this one)


def run(ctx: Context, options: AllOptions) -> int:
    """Rebuild the run the options name onto the configured server; the exit code."""
    journal = RestoreJournal.of(ctx.config)
    refuse_pending_server(journal, ctx.path)
    maps = poolmap.parse(options.pool_map)
    incus = ctx.incus()
    member = require_member(incus, options.target)  # before the run is read
    source = open_run(ctx, options.archive, options.label, latest=NEWEST_COMPLETE)
    plan = prepare(incus, source, maps, projects=options.projects, member=member)
    show(plan, options.dry_run)
    refuse_collisions(plan, options.dry_run)
    if options.dry_run:
        return 0
    with signals.interruptible():
        outcome = rebuild.carry_out(incus, plan, journal)
    kept = f", {len(outcome.kept)} already here and left alone" if outcome.kept else ""
    updated = f", {len(outcome.updated)} updated from the archive" if outcome.updated else ""
    report(f"restore all: {len(outcome.created)} created{updated}{kept}")
    if options.start:
        started = start_running(incus, plan, outcome.created)
        failed = [f"{node.label}: {why}" for node, why in started.items() if isinstance(why, str)]
        if failed:
            raise UserError(f"restored, but not every instance starts: {'; '.join(failed)}")
    return outcome.exit_code


def prepare(
    incus: Incus,
    source: Source,
    maps: dict[str, PoolMap],
    projects: Iterable[str] = (),
    instances: Iterable[str] = (),
    member: str | None = None,
) -> Plan:
    """The plan for the run: everything, or the named projects' entities, or the named
    instances ([P/]NAME), each with what it needs (its instances and volumes onto cluster
    member `member`, when given)."""
    whole = rebuild.read_graph(source)
    pools = rebuild.complete_map(whole, maps)
    nodes = selected(source, whole, projects, instances)
    return rebuild.make_plan(incus, source, whole, pools, nodes, member)


def selected(
    source: Source, whole: Graph, projects: Iterable[str], instances: Iterable[str]
) -> set[Node]:
    """The nodes a selection needs: the named projects' entities and the named instances
    (with the other members of their consistency groups), with everything they refer to;
    all of them when nothing is named."""
    projects, instances = list(projects), list(instances)
    if not projects and not instances:
        return set(whole.definitions)
    known = {n.name for n in whole.of_kind("projects")}
    unknown = sorted(set(projects) - known)
    if unknown:
        raise UserError(
            f"--project {unknown[0]}: the run has no such project (it has: {', '.join(sorted(known))})"
        )
    roots = [
        n
        for n in whole.definitions
        if n.project in projects or (n.kind == "projects" and n.name in projects)
    ]
    for ref in instances:
        found = matching(source.manifest, "instance", ref)
        if len(found) != 1:
            held = ", ".join(i.ref for i in source.manifest.instances) or "none"
            why = (
                "is ambiguous: add the project"
                if found
                else f"is not in the run (it holds: {held})"
            )
            raise UserError(f"instance {ref!r} {why}")
        roots += [Node("instances", i.project, i.name) for i in group_of(source, found[0])]
    return graph.closure(whole, roots)


def group_of(source: Source, item: Item) -> list[Item]:
    """The instances restored with `item`: its consistency group's members in the run (they
    come back as a group), or itself."""
    if item.group is None:
        return [item]
    return [i for i in source.manifest.instances if i.group == item.group and i.failed is None]


def show(plan: Plan, dry_run: bool) -> None:
    """The plan: in a dry run every step, else what is left alone and what collides."""
    counts = Counter(step.action for step in plan.steps)
    what = " (dry run: nothing is changed)" if dry_run else ""
    collide = f", {counts[COLLIDE]} colliding" if counts[COLLIDE] else ""
    report(
        f"restore all from {plan.source.description}{what}: {counts[CREATE]} to create, "
        f"{counts[UPDATE]} to update (as Incus made them), {counts[EXISTS]} already here "
        f"(left alone){collide}"
    )
    for step in plan.steps:
        if dry_run or step.action in (EXISTS, COLLIDE):
            report(step.line())


def refuse_collisions(plan: Plan, dry_run: bool) -> None:
    """Stop before anything changes when a step is known to fail here."""
    if plan.collisions:
        labels = ", ".join(here_node(plan, step.node).label for step in plan.collisions)
        would = "would stop" if dry_run else "stopped before changing anything"
        raise UserError(
            f"restore all {would}: {len(plan.collisions)} collision(s) with this server: "
            f"{labels} (see the lines marked collide)"
        )


def priority(plan: Plan, node: Node) -> int:
    """An instance's `boot.autostart.priority` (0 when unset or not a number)."""
    definition = plan.graph.definitions.get(node, {})
    config = definition.get("expanded_config") or definition.get("config") or {}
    try:
        return int(config.get("boot.autostart.priority", 0))
    except ValueError:
        return 0


def start_running(incus: Incus, plan: Plan, created: list[Node]) -> dict[Node, float | str]:
    """Start the created instances that were running at backup time, highest
    `boot.autostart.priority` first, each waited for until it runs (a consistency group's
    members together, side by side, where its first member comes); per instance the
    seconds it took, or why it did not start."""
    wanted = [
        n for n in created if n.kind == "instances" and plan.graph.items[n].state == "Running"
    ]
    wanted.sort(key=lambda n: (-priority(plan, n), n.project, n.name))
    results: dict[Node, float | str] = {}
    for unit in _together(plan, wanted):
        for node, outcome in zip(
            unit,
            side_by_side(lambda n: start_and_wait(incus, n.project, n.name), unit),
            strict=True,
        ):
            if isinstance(outcome, UserError):
                results[node] = str(outcome)
                report(f"{node.label}: does not start: {outcome}")
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                results[node] = outcome
                report(f"{node.label}: started")
        group = plan.graph.items[unit[0]].group
        if group is not None:
            report(f"group {group}: {len(unit)} member(s) started together")
    return results


def _together(plan: Plan, nodes: list[Node]) -> list[list[Node]]:
    """The nodes in their order, each group's members in one unit where its first comes."""
    units: list[list[Node]] = []
    for node in nodes:
        group = plan.graph.items[node].group
        if group is None:
            units.append([node])
        elif not any(plan.graph.items[u[0]].group == group for u in units):
            units.append([n for n in nodes if plan.graph.items[n].group == group])
    return units
