"""`incus-borg init`: create every configured repository and export its key."""

from __future__ import annotations

import os
import re
from pathlib import Path

import click

from ..borg import Borg, Secrets, info_argv, init_argv, key_export_argv
from ..config import DEFAULT_CONFIG_PATH, Repository
from ..context import Context
from ..errors import UserError

ALREADY_EXISTS = 10
DOES_NOT_EXIST = 13


def encryption_for(repo: Repository, secrets: Secrets) -> str:
    """The encryption mode to create `repo` with, or a UserError when none is safe."""
    if repo.encryption is not None:
        if repo.encryption != "none" and not secrets.available:
            raise UserError(
                f"repository {repo.name} asks for {repo.encryption} but no passphrase is "
                "configured: set encryption_passphrase or encryption_passcommand"
            )
        return repo.encryption
    if secrets.available:
        return "repokey-blake2"
    raise UserError(
        f"repository {repo.name}: no passphrase is configured; set encryption_passphrase or "
        "encryption_passcommand, or set `encryption: none` for this repository"
    )


def key_export_path(ctx: Context, repo: Repository) -> Path:
    """Where the key export of `repo` is written: next to the configuration file."""
    directory = (ctx.path or DEFAULT_CONFIG_PATH).resolve().parent
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", repo.name).strip("_") or "repository"
    return directory / f"{safe}.borg-key"


def write_private(path: Path, content: str) -> None:
    """Write `content` to `path` readable by its owner only (0600), replacing it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def exported_id(text: str) -> str | None:
    """The repository id a key export names in its first line (`BORG_KEY <id>`), or None."""
    first = text.partition("\n")[0].split()
    return first[1] if len(first) == 2 and first[0] == "BORG_KEY" else None


def refuse_foreign_export(path: Path, repo: Repository, repo_id: str | None) -> None:
    """Refuse (exit 2, the file untouched) when `path` exists and is not the key export of
    the repository whose id is `repo_id` (None: a repository not created yet)."""
    try:
        held = exported_id(path.read_text(errors="replace"))
    except FileNotFoundError:
        return
    if held is not None and held == repo_id:
        return
    what = f"the key of another repository (id {held})" if held else "no Borg key export"
    raise UserError(
        f"{path} holds {what}, not the key of repository {repo.name} ({repo.path}): move that "
        "file away and keep it (it may be the only copy of a key), then run init again"
    )


def repository_id(borg: Borg, repo: Repository) -> str | None:
    """The id of an existing repository, None when it does not exist."""
    info = borg.run(info_argv(repo), repo, ok_codes=(DOES_NOT_EXIST,))
    return str(info.json()["repository"]["id"]) if info.returncode == 0 else None


def export_keys(ctx: Context, label: str | None, paper: bool) -> None:
    """Print the key export of every selected (encrypted) repository."""
    borg = ctx.borg()
    for repo in ctx.config.select_repositories(label):
        click.echo(f"# repository {repo.name} ({repo.path})")
        click.echo(borg.run(key_export_argv(repo, paper), repo).stdout, nl=False)


def run(ctx: Context, label: str | None) -> None:
    """Create the repositories (all, or the one labelled `label`); refuse first, creating
    nothing, when a key export file that would be written holds another repository's key."""
    borg = ctx.borg()
    repos = ctx.config.select_repositories(label)
    modes = {repo.name: encryption_for(repo, borg.secrets.for_repository(repo)) for repo in repos}
    for repo in repos:
        path = key_export_path(ctx, repo)
        if modes[repo.name] != "none" and path.exists():
            refuse_foreign_export(path, repo, repository_id(borg, repo))
    for repo in repos:
        mode = modes[repo.name]
        result = borg.run(init_argv(repo, mode), repo, ok_codes=(ALREADY_EXISTS,))
        if result.returncode == ALREADY_EXISTS:
            click.echo(f"repository {repo.name}: already exists at {repo.path}, left alone")
            continue
        click.echo(f"repository {repo.name}: created at {repo.path} ({mode})")
        if mode == "none":
            continue
        exported = borg.run(key_export_argv(repo), repo).stdout
        path = key_export_path(ctx, repo)
        refuse_foreign_export(path, repo, exported_id(exported))
        write_private(path, exported)
        click.echo(f"repository {repo.name}: key exported to {path} (mode 0600)")
        click.echo(
            "  KEEP A COPY OF THIS KEY AND THE PASSPHRASE OFF THIS HOST: without them the "
            "backups cannot be read."
        )
