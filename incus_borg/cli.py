"""The `incus-borg` command line: parse options, call an action, map errors to exit codes."""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass

import click

from . import config as config_module
from .actions import backup as backup_action
from .actions import hooks as hook_actions
from .actions import init as init_action
from .actions import list_archives
from .borg import Borg, Secrets
from .errors import EXIT_ERROR, UserError


@dataclass
class Options:
    """Global options shared by every command."""

    config_file: str | None
    debug: bool

    def load(self) -> config_module.LoadedConfig:
        """The validated configuration these options point at."""
        return config_module.load(self.config_file)

    def borg(self, loaded: config_module.LoadedConfig) -> Borg:
        """A borg runner holding the configuration's secrets."""
        return Borg(Secrets.from_config(loaded.config), debug=self.debug)


pass_options = click.make_pass_decorator(Options)
repository_option = click.option(
    "--repository", "label", metavar="LABEL", help="Only the repository with this label."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    "config_file",
    metavar="FILE",
    help="Configuration file (default: $INCUS_BORG_CONFIG, then /etc/incus-borg/config.yaml).",
)
@click.option(
    "-v", "--verbose", "--debug", "debug", is_flag=True, help="Show details and tracebacks."
)
@click.version_option(package_name="incus-borg")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, debug: bool) -> None:
    """Consistent, deduplicated Borg backups of a whole Incus server, and their restore."""
    ctx.obj = Options(config_file, debug)


@cli.command()
@repository_option
@pass_options
def init(options: Options, label: str | None) -> None:
    """Create every configured Borg repository and export its key."""
    loaded = options.load()
    init_action.run(loaded, options.borg(loaded), label)


@cli.command(name="list")
@repository_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_options
def list_command(options: Options, label: str | None, as_json: bool) -> None:
    """List the archives in the repositories."""
    loaded = options.load()
    list_archives.run(loaded.config, options.borg(loaded), label, as_json)


mode_option = click.option(
    "--mode",
    type=click.Choice(["auto", "snapshot", "freeze", "stop", "none"]),
    help="How to quiesce instances (default: the config's `mode`).",
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
    loaded = options.load()
    wanted = backup_action.BackupOptions(mode, instances, label, dry_run, as_json, progress)
    return backup_action.run(loaded.config, options.borg(loaded), wanted)


@cli.group()
def hook() -> None:
    """Pre/post hooks for borgmatic, restic or any other backup program."""


@hook.command()
@mode_option
@instance_option
@pass_options
def pre(options: Options, mode: str | None, instances: tuple[str, ...]) -> int:
    """Quiesce Incus and lay out the staging tree for another program to back up."""
    return hook_actions.pre(options.load().config, mode, instances)


@hook.command()
@click.option("--failed", is_flag=True, help="The backup program failed (same cleanup).")
@pass_options
def post(options: Options, failed: bool) -> int:
    """Release every quiesce left by `hook pre` and empty the staging tree."""
    return hook_actions.post(options.load().config, failed)


@cli.group(name="config")
def config_group() -> None:
    """Print a sample configuration, or check a configuration file."""


@config_group.command()
def generate() -> None:
    """Print a commented sample configuration with every key and its default."""
    click.echo(config_module.sample(), nl=False)


@config_group.command()
@click.argument("file", required=False)
@pass_options
def validate(options: Options, file: str | None) -> None:
    """Check a configuration file (default: the one -c or the environment names)."""
    loaded = config_module.load(file or options.config_file)
    source = loaded.path or "built-in defaults"
    click.echo(f"{source}: valid")


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
    sys.exit(code if isinstance(code, int) else 0)
