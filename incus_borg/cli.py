"""The `incus-borg` command line: parse options, call an action, map errors to exit codes.

Each command imports its action when it runs: a command then loads only the modules it
needs (the whole package takes about 0.1 s more to import than `list` needs).
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import click

from . import config as config_module
from . import profile
from .context import Context
from .errors import EXIT_ERROR, UserError


@dataclass
class Options:
    """Global options shared by every command."""

    config_file: str | None
    debug: bool

    def context(self, member: str | None = None) -> Context:
        """The validated configuration these options point at, ready for an action
        (`member`: whose runs `latest` and `prune` mean, from --member)."""
        config, path = config_module.load(self.config_file)
        return Context(config, path, self.debug, member)


pass_options = click.make_pass_decorator(Options)
repository_option = click.option(
    "--repository", "label", metavar="LABEL", help="Only the repository with this label."
)
member_option = click.option(
    "--member",
    metavar="NAME",
    help="On a cluster: `latest` means this member's newest run (default: this member's).",
)
target_option = click.option(
    "--target",
    metavar="MEMBER",
    help="On a cluster: restore onto this member (default: the one running the command).",
)


def show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """--version: the three versions (borg missing or Incus down is said, not an error)."""
    if value and not ctx.resilient_parsing:
        from .actions import version as version_action

        click.echo(version_action.report(ctx.params.get("config_file")))
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    "config_file",
    metavar="FILE",
    help="Configuration file (default: $INCUS_BORG_CONFIG, then /etc/incus-borg/config.yaml).",
    is_eager=True,  # before --version, which names the configured Incus
)
@click.option(
    "-v", "--verbose", "--debug", "debug", is_flag=True, help="Show details and tracebacks."
)
@click.option(
    "--profile",
    "show_profile",
    is_flag=True,
    help="At the end, print the wall and CPU time of each phase of the command on stderr.",
)
@click.option(
    "--version",
    is_flag=True,
    is_eager=True,
    expose_value=False,
    callback=show_version,
    help="Show the versions of incus-borg, of its borg and of the Incus server, and exit.",
)
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, debug: bool, show_profile: bool) -> None:
    """Consistent, deduplicated Borg backups of a whole Incus server, and their restore."""
    ctx.obj = Options(config_file, debug)
    profile.PROFILE.enabled = show_profile


@cli.command()
@repository_option
@pass_options
def init(options: Options, label: str | None) -> None:
    """Create every configured Borg repository and export its key."""
    from .actions import init as init_action

    init_action.run(options.context(), label)


@cli.command(name="list")
@click.argument("archive", required=False)
@repository_option
@member_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_options
def list_command(
    options: Options, archive: str | None, label: str | None, member: str | None, as_json: bool
) -> None:
    """List the runs in the repositories, or what one run (ARCHIVE) holds."""
    from .actions import list_runs

    list_runs.run(options.context(member), archive, label, as_json)


@cli.command()
@repository_option
@click.option("--dry-run", is_flag=True, help="Say what would be deleted, delete nothing.")
@click.option(
    "--member", metavar="NAME", help="On a cluster: prune this member's runs (default: this one's)."
)
@click.option("--all-members", is_flag=True, help="On a cluster: prune every member's runs.")
@pass_options
def prune(
    options: Options, label: str | None, dry_run: bool, member: str | None, all_members: bool
) -> int:
    """Delete incus-borg's runs beyond the retention (never other archives), then compact.

    On a cluster the retention applies to each member's runs apart, and only this member's
    runs are pruned unless --member or --all-members says otherwise.
    """
    from .actions import prune as prune_action

    return prune_action.run(options.context(member), label, dry_run, all_members)


@cli.command()
@repository_option
@click.option("--verify-data", is_flag=True, help="Read and verify every chunk (slow).")
@click.option(
    "--restore-test",
    is_flag=True,
    help="Import the newest run's instances into a scratch project and compare every file.",
)
@click.option(
    "--drill",
    is_flag=True,
    help="Restore the newest complete run whole into a scratch Incus (own network namespace), "
    "compare every file, start what ran, tear it all down.",
)
@click.option(
    "--instance",
    "--instances",
    "drill_instances",
    multiple=True,
    metavar="[P/]NAME",
    help="With --drill: only this instance and what it needs (repeatable).",
)
@click.option(
    "--scratch",
    metavar="DIR",
    help="With --drill: where the scratch Incus goes (default: beside staging_dir).",
)
@pass_options
def check(
    options: Options,
    label: str | None,
    verify_data: bool,
    restore_test: bool,
    drill: bool,
    drill_instances: tuple[str, ...],
    scratch: str | None,
) -> int:
    """Check the repositories, and optionally that the newest run really restores."""
    if (drill_instances or scratch) and not drill:
        raise UserError("--instance and --scratch go with --drill")
    from .actions import check as check_action
    from .actions import drill as drill_action

    drilled = drill_action.DrillOptions(drill_instances, Path(scratch) if scratch else None)
    wanted = check_action.CheckOptions(label, verify_data, restore_test, drilled if drill else None)
    return check_action.run(options.context(), wanted)


@cli.command()
@repository_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--refresh",
    is_flag=True,
    help="First read the runs the local index does not know from the repositories "
    "(after runs made by borgmatic, or another host).",
)
@pass_options
def status(options: Options, label: str | None, as_json: bool, refresh: bool) -> int:
    """Is every instance and custom volume backed up? Exit 1 when anything is STALE, NEVER
    or FAILED, 0 when everything is OK or SKIPPED."""
    from .actions import status as status_action

    wanted = status_action.StatusOptions(label, as_json, refresh)
    return status_action.run(options.context(), wanted)


@cli.command()
@click.option("--html", "path", required=True, metavar="FILE", help="Write the page here.")
@repository_option
@click.option("--days", default=30, show_default=True, help="Days the timelines show.")
@pass_options
def report(options: Options, path: str, label: str | None, days: int) -> None:
    """Write one self-contained HTML page: status, a timeline per instance, repository
    growth, quiesce windows and daemon downtime per run."""
    from .actions import report as report_action

    report_action.run(options.context(), report_action.ReportOptions(Path(path), label, days))


@cli.group()
def key() -> None:
    """Export repository keys (keep a copy off this host)."""


@key.command(name="export")
@click.option("--paper", is_flag=True, help="A paper backup: text to print and type back in.")
@repository_option
@pass_options
def key_export(options: Options, paper: bool, label: str | None) -> None:
    """Print the key export of each repository on stdout."""
    from .actions import init as init_action

    init_action.export_keys(options.context(), label, paper)


mode_option = click.option(
    "--mode",
    type=click.Choice(["auto", "snapshot", "freeze", "stop", "none", "export"]),
    help="How to quiesce instances, or `export` to read them through Incus's backup stream "
    "(default: the config's `mode`).",
)
instance_option = click.option(
    "--instance",
    "instances",
    multiple=True,
    metavar="[P/]NAME",
    help="Only this instance (repeatable; default: the config's `instances`, else all).",
)


@cli.command()
@mode_option
@instance_option
@repository_option
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("--progress", is_flag=True, help="Show borg's progress.")
@pass_options
def backup(
    options: Options,
    mode: str | None,
    instances: tuple[str, ...],
    label: str | None,
    dry_run: bool,
    as_json: bool,
    progress: bool,
) -> int:
    """Back up the whole Incus server into every repository."""
    from .actions import backup as backup_action

    wanted = backup_action.BackupOptions(mode, instances, label, dry_run, as_json, progress)
    return backup_action.run(options.context(), wanted)


@cli.group()
def hook() -> None:
    """Pre/post hooks for borgmatic, restic or any other backup program."""


@hook.command()
@mode_option
@instance_option
@click.option(
    "--hold",
    type=click.Choice(["just-in-time", "whole-run"]),
    help="Quiesce each instance only while Borg reads it (a gate keeper stays behind), or "
    "everything until `hook post` (restic) (default: the config's `hook_hold`).",
)
@pass_options
def pre(options: Options, mode: str | None, instances: tuple[str, ...], hold: str | None) -> int:
    """Lay out the staging tree for another program to back up, each instance quiesced
    while it is read (or, with --hold whole-run, until `hook post`)."""
    from .actions import hook as hook_action

    wanted = hook_action.PreOptions(mode, instances, hold)
    return hook_action.pre(options.context(), wanted)


@hook.command()
@click.option("--failed", is_flag=True, help="The backup program failed (same cleanup).")
@pass_options
def post(options: Options, failed: bool) -> int:
    """Release every quiesce left by `hook pre` and empty the staging tree."""
    from .actions import hook as hook_action

    return hook_action.post(options.context(), failed)


as_option = click.option(
    "--as", "new_name", metavar="NEW", help="Restore under this name, beside the original."
)
pool_option = click.option(
    "--pool", metavar="POOL", help="Onto this storage pool (default: the original's)."
)


@cli.group()
def restore() -> None:
    """Restore instances, volumes, definitions, files or the whole server from a run.

    ARCHIVE is an archive name, `latest`, or a directory holding a restored staging tree.
    """


@restore.command(name="instance")
@click.argument("archive")
@click.argument("name", metavar="[P/]NAME")
@as_option
@pool_option
@click.option("--project", metavar="P", help="Into this project (default: the original's).")
@click.option("--start", is_flag=True, help="Start the instance once restored.")
@click.option("--with-volumes", is_flag=True, help="Also restore its missing custom volumes.")
@click.option(
    "--stream",
    is_flag=True,
    help="Stream the data through `incus import` instead of extracting it into the pool "
    "(always done for pools other than dir and btrfs).",
)
@target_option
@repository_option
@member_option
@pass_options
def restore_instance(
    options: Options,
    archive: str,
    name: str,
    new_name: str | None,
    pool: str | None,
    project: str | None,
    start: bool,
    with_volumes: bool,
    stream: bool,
    target: str | None,
    label: str | None,
    member: str | None,
) -> int:
    """Restore one instance with its snapshots.

    Incus imports the instance's definition; the data is extracted straight into the new
    volumes on dir and btrfs pools, and streamed into `incus import` on other pools.
    """
    from .restore import instance as instance_kind

    wanted = instance_kind.InstanceOptions(
        name, new_name, pool, project, start, with_volumes, stream, target=target
    )
    return instance_kind.run(options.context(member), archive, label, wanted)


@restore.command(name="group")
@click.argument("name", metavar="[P/]GROUP")
@click.argument("archive", default="latest")
@pool_option
@click.option("--project", metavar="P", help="Into this project (default: each one's).")
@click.option("--start", is_flag=True, help="Start the members together once restored.")
@click.option("--with-volumes", is_flag=True, help="Also restore their missing custom volumes.")
@click.option(
    "--stream", is_flag=True, help="Stream the data through `incus import` (as restore instance)."
)
@click.option(
    "--replace",
    is_flag=True,
    help="Replace the members that exist, once every member is restored and verified.",
)
@target_option
@repository_option
@member_option
@pass_options
def restore_group(
    options: Options,
    name: str,
    archive: str,
    pool: str | None,
    project: str | None,
    start: bool,
    with_volumes: bool,
    stream: bool,
    replace: bool,
    target: str | None,
    label: str | None,
    member: str | None,
) -> int:
    """Restore a consistency group's instances together (ARCHIVE: default latest).

    Every member is built under a temporary name and verified; only then do they all take
    their names. If one fails, none is restored or replaced.
    """
    from .restore import group as group_kind

    wanted = group_kind.GroupOptions(
        name, pool, project, start, with_volumes, stream, target=target, replace=replace
    )
    return group_kind.run(options.context(member), archive, label, wanted)


@restore.command(name="volume")
@click.argument("archive")
@click.argument("name", metavar="POOL/[P/]NAME")
@as_option
@pool_option
@target_option
@repository_option
@member_option
@pass_options
def restore_volume(
    options: Options,
    archive: str,
    name: str,
    new_name: str | None,
    pool: str | None,
    target: str | None,
    label: str | None,
    member: str | None,
) -> None:
    """Restore one custom volume (filesystem or block) with its snapshots."""
    from .restore import volume as volume_kind

    wanted = volume_kind.VolumeOptions(archive, name, new_name, pool, label, target)
    volume_kind.run(options.context(member), wanted)


@restore.command(name="all")
@click.argument("archive")
@click.option(
    "--pool-map",
    "pool_map",
    multiple=True,
    metavar="OLD=NEW[:DRIVER[:KEY=VALUE,...]]",
    help="Put archived pool OLD's volumes onto pool NEW (created with DRIVER and settings when "
    "given and missing; repeatable).",
)
@click.option(
    "--project", "projects", multiple=True, metavar="P", help="Only this project (repeatable)."
)
@click.option("--dry-run", is_flag=True, help="Print the plan and every collision; change nothing.")
@click.option("--start", is_flag=True, help="Start what was running at backup time.")
@target_option
@repository_option
@member_option
@pass_options
def restore_all(
    options: Options,
    archive: str,
    pool_map: tuple[str, ...],
    projects: tuple[str, ...],
    dry_run: bool,
    start: bool,
    target: str | None,
    label: str | None,
    member: str | None,
) -> int:
    """Rebuild a whole run onto this server (on a cluster: onto one member): projects,
    pools, networks, profiles, volumes and instances, in dependency order; what exists is
    left alone.

    `latest` is the newest complete run (on a cluster: of this member, or of --member).
    """
    from .restore import all as all_kind

    wanted = all_kind.AllOptions(archive, pool_map, projects, dry_run, start, label, target)
    return all_kind.run(options.context(member), wanted)


@restore.command(name="config")
@click.argument("archive")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--profiles", is_flag=True, help="Profiles.")
@click.option("--networks", is_flag=True, help="Managed networks.")
@click.option("--projects", is_flag=True, help="Projects.")
@click.option("--pools", is_flag=True, help="Storage pools.")
@click.option("--replace", is_flag=True, help="Overwrite entities that exist.")
@repository_option
@member_option
@pass_options
def restore_config(
    options: Options,
    archive: str,
    names: tuple[str, ...],
    profiles: bool,
    networks: bool,
    projects: bool,
    pools: bool,
    replace: bool,
    label: str | None,
    member: str | None,
) -> None:
    """Recreate projects, pools, networks and profiles from the archive's definitions (on a
    cluster, pools and networks with each member's own config)."""
    chosen = (("projects", projects), ("networks", networks), ("profiles", profiles))
    kinds = [k for k, on in (*chosen, ("storage-pools", pools)) if on]
    from .restore import config as config_kind

    wanted = config_kind.ConfigOptions(archive, kinds, names, replace, label)
    config_kind.run(options.context(member), wanted)


@restore.command(name="files")
@click.argument("archive")
@click.argument("name", metavar="[P/]NAME")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--to", "dest", required=True, metavar="DIR", help="Where to write them.")
@click.option("--overwrite", is_flag=True, help="Replace files that exist under DIR.")
@repository_option
@member_option
@pass_options
def restore_files(
    options: Options,
    archive: str,
    name: str,
    paths: tuple[str, ...],
    dest: str,
    overwrite: bool,
    label: str | None,
    member: str | None,
) -> None:
    """Copy files or directories out of an instance (or POOL/[P/]NAME volume) into DIR."""
    from .restore import files as files_kind

    wanted = files_kind.FilesOptions(archive, name, paths, Path(dest), label, overwrite)
    files_kind.run(options.context(member), wanted)


@restore.command(name="server")
@click.argument("archive", required=False)
@click.option("--yes", is_flag=True, help="Confirm: the Incus directory is replaced (kept aside).")
@click.option(
    "--roll-back",
    is_flag=True,
    help="Put back the Incus directory that a killed restore server moved aside.",
)
@repository_option
@pass_options
def restore_server(
    options: Options, archive: str | None, yes: bool, roll_back: bool, label: str | None
) -> None:
    """Restore the whole server; the current Incus directory is moved aside, never deleted."""
    from .restore import server as server_kind

    wanted = server_kind.ServerOptions(archive, yes, label, roll_back)
    server_kind.run(options.context(), wanted)


@cli.group(name="config")
def config_group() -> None:
    """Print a sample configuration, or check a configuration file."""


@config_group.command()
@click.option(
    "--borgmatic",
    "for_borgmatic",
    is_flag=True,
    help="Print a borgmatic fragment (staging path, hooks) for this host instead.",
)
@pass_options
def generate(options: Options, for_borgmatic: bool) -> None:
    """Print a commented sample configuration, or a borgmatic fragment for this host."""
    from .actions import configuration

    click.echo(configuration.generate(options.context(), for_borgmatic), nl=False)


@config_group.command()
@click.argument("file", required=False)
@pass_options
def validate(options: Options, file: str | None) -> None:
    """Check a configuration file (default: the one -c or the environment names; `-` reads
    standard input)."""
    from .actions import configuration

    click.echo(configuration.validate(file or options.config_file))


def main() -> None:
    """Entry point: run the CLI; errors become one line on stderr and exit code 2."""
    debug = "-v" in sys.argv or "--verbose" in sys.argv or "--debug" in sys.argv
    try:
        code = cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = EXIT_ERROR
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("incus-borg: error: interrupted; every quiesce was undone", file=sys.stderr)
        code = EXIT_ERROR
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"incus-borg: error: {exc}", file=sys.stderr)
        code = EXIT_ERROR
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(
            f"incus-borg: error: unexpected {type(exc).__name__}: {exc} (run with --debug "
            "for details)",
            file=sys.stderr,
        )
        code = EXIT_ERROR
    if profile.PROFILE.enabled:
        profile.PROFILE.print(sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)
