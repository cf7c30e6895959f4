"""`incus-borg prune`: apply the retention to incus-borg's runs only, then compact.

A run is its run archive and its part archives; they are kept or deleted together (see
retention.py for which). Archives made by anything else (a shared borgmatic repository) are
never touched. On a cluster the retention applies per member: a member prunes its own runs,
and another member's only when asked (`--member NAME`, `--all-members`).
"""

from __future__ import annotations

from functools import partial

import click

from .. import monitoring, preflight, runs
from ..borg import Borg, BorgResult, compact_argv, delete_argv
from ..config import Repository, Retention
from ..context import Context
from ..errors import UserError, Warnings
from ..runs import retention
from ..runs.catalogue import Catalogue


def run(ctx: Context, label: str | None, dry_run: bool, all_members: bool = False) -> int:
    """Prune every selected repository; returns the exit code."""
    action = partial(_run, ctx, label, dry_run, all_members)
    return monitoring.watched(ctx, "prune", action, enabled=not dry_run)


def _run(ctx: Context, label: str | None, dry_run: bool, all_members: bool) -> int:
    config, borg = ctx.config, ctx.borg()
    scope = ctx.scope(every=all_members)
    warnings = Warnings()
    for repo in config.select_repositories(label):
        policy = repo.retention or config.retention
        problem = preflight.retention_problem("retention", policy)
        if problem:
            raise UserError(f"repository {repo.name}: {problem}")
        ours = [r for r in runs.find(borg, repo) if r.ours]
        doomed = select(repo, [r for r in ours if scope.holds(r)], policy, dry_run, borg)
        others = runs.members(r for r in ours if not scope.holds(r))
        if others:
            click.echo(
                f"repository {repo.name}: runs of other members ({', '.join(others)}) left "
                "alone; --member NAME or --all-members prunes them"
            )
        if dry_run or not doomed:
            continue
        deleted = [a for r in doomed for a in r.archives]
        borg.run(delete_argv(repo, deleted), repo)
        Catalogue.beside(config.staging_dir).forget(repo.path, deleted)
        monitoring.forget(ctx, repo.name, [r.name for r in doomed])
        compact(borg, repo, warnings)
    return warnings.exit_code


def select(
    repo: Repository, within: list[runs.Run], policy: Retention, dry_run: bool, borg: Borg
) -> list[runs.Run]:
    """Apply the policy to the runs of each member (or of servers not clustered) apart,
    printing what is kept and deleted; returns the runs to delete."""
    doomed = []
    groups: dict[str | None, list[runs.Run]] = {}
    for found in within:
        groups.setdefault(found.member, []).append(found)
    for group in groups.values():
        chosen = retention.select(runs.resolve(borg, repo, group), policy)
        for kept, why in chosen.keep:
            click.echo(f"repository {repo.name}: keeping {kept.name} ({why})")
        verb = "would delete" if dry_run else "deleting"
        for gone, why in chosen.delete:
            click.echo(f"repository {repo.name}: {verb} {gone.name} ({why})")
        doomed += [gone for gone, _ in chosen.delete]
    return doomed


def compact(borg: Borg, repo: Repository, warnings: Warnings) -> None:
    """`borg compact`, unless the repository is known to be append-only; a warning when the
    server did not compact (it keeps the deleted runs until its owner compacts it)."""
    if not repo.append_only and compacted(borg.run(compact_argv(repo), repo)):
        click.echo(f"repository {repo.name}: compacted")
        return
    warnings.add(
        f"repository {repo.name} is append-only (it was not compacted): the deleted runs stay "
        "recoverable, and space is reclaimed only by the server's owner"
    )


def compacted(result: BorgResult) -> bool:
    """Whether `borg compact --info` really compacted: Borg then says how much it freed (an
    append-only repository, local or served with --append-only, says nothing)."""
    return any("compaction freed" in str(m.get("message", "")) for m in result.messages)
