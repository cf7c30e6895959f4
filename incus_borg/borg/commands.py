"""Borg command lines: one pure function per command incus-borg runs."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..config import Repository


def init_argv(repo: Repository, encryption: str) -> list[str]:
    """Create a repository (and its parent directories)."""
    return ["init", "--make-parent-dirs", "--encryption", encryption, repo.path]


def key_export_argv(repo: Repository, paper: bool = False) -> list[str]:
    """Export the repository key to stdout."""
    return ["key", "export", *(["--paper"] if paper else []), repo.path]


def list_argv(repo: Repository) -> list[str]:
    """List a repository's archives as JSON."""
    return ["list", "--json", repo.path]


def list_archives_argv(repo: Repository) -> list[str]:
    """Every archive, checkpoints too, as JSON with its comment and creating command line."""
    fmt = "{comment}{command_line}"
    return ["list", "--consider-checkpoints", "--json", "--format", fmt, repo.path]


def delete_argv(repo: Repository, archives: Sequence[str]) -> list[str]:
    """Delete archives from a repository."""
    return ["delete", repo.path, *archives]


def compact_argv(repo: Repository) -> list[str]:
    """Free the space of deleted archives, logging how much (append-only: nothing)."""
    return ["compact", "--info", repo.path]


def check_argv(repo: Repository, verify_data: bool) -> list[str]:
    """Check a repository and its archives (reading every chunk with `verify_data`)."""
    return ["check", *(["--verify-data"] if verify_data else []), repo.path]


def list_files_argv(repo: Repository, archive: str, path: str) -> list[str]:
    """Mode, owner, size and sha256 of every item below `path` in an archive, as JSON lines."""
    fmt = "{mode}{uid}{gid}{size}{sha256}{type}{path}"
    return ["list", "--json-lines", "--format", fmt, f"{repo.path}::{archive}", path]


def info_argv(repo: Repository) -> list[str]:
    """Repository information as JSON (cheap: proves it exists and the passphrase is right)."""
    return ["info", "--json", repo.path]


def create_argv(
    repo: Repository,
    archive: str,
    paths: Sequence[str],
    *,
    excludes: Sequence[str] = (),
    files_cache: str | None = None,
    progress: bool = False,
    comment: str = "",
    read_special: bool = False,
    chunker_params: str | None = None,
) -> list[str]:
    """Create `archive` from `paths` (relative to the caller's working directory);
    `read_special` reads FIFOs as files (only ever given paths of FIFOs of our own)."""
    # --list --filter=AMEx logs only files that were not unchanged in the files cache, and
    # what was excluded (so that a run can tell it held everything it must).
    argv = ["create", "--json", "--numeric-ids", "--list", "--filter=AMEx"]
    if comment:
        argv += ["--comment", comment]
    if files_cache:
        argv += ["--files-cache", files_cache]
    if progress:
        argv.append("--progress")
    if read_special:
        argv.append("--read-special")
    if chunker_params:
        argv += ["--chunker-params", chunker_params]
    for pattern in excludes:
        argv += ["--exclude", pattern]
    return [*argv, f"{repo.path}::{archive}", *paths]


def comment_argv(repo: Repository, archive: str, comment: str) -> list[str]:
    """Set an archive's comment (borg rewrites its metadata, not its data)."""
    return ["recreate", "--comment", comment, f"{repo.path}::{archive}"]


def extract_stdout_argv(repo: Repository, archive: str, path: str) -> list[str]:
    """One file of an archive, on stdout."""
    return ["extract", "--stdout", f"{repo.path}::{archive}", path]


def export_tar_argv(repo: Repository, archive: str, path: str, strip: int) -> list[str]:
    """A subtree of an archive as an uncompressed tar stream on stdout."""
    return ["export-tar", "--strip-components", str(strip), f"{repo.path}::{archive}", "-", path]


def extract_argv(
    repo: Repository,
    archive: str,
    paths: Sequence[str],
    strip: int,
    excludes: Sequence[str] = (),
) -> list[str]:
    """Extract paths of an archive (less the `excludes` subtrees) into the working directory,
    with numeric owners and holes kept."""
    location = f"{repo.path}::{archive}"
    argv = ["extract", "--numeric-ids", "--sparse", "--strip-components", str(strip)]
    for path in excludes:
        argv += ["--exclude", f"pp:{path}"]
    return [*argv, location, *paths]


def list_tree_argv(repo: Repository, archive: str, *paths: str) -> list[str]:
    """`TYPE SIZE FLAGS`, link source and path of every item below `paths`, each field ended
    by a NUL byte (no path holds one)."""
    fmt = "{type} {size} {flags}{NUL}{source}{NUL}{path}{NUL}"
    return ["list", "--format", fmt, f"{repo.path}::{archive}", *paths]


def list_exact_argv(repo: Repository, archive: str, paths: Sequence[str]) -> list[str]:
    """Which of exactly these paths an archive holds, one per line."""
    wanted = "|".join(re.escape(path) for path in paths)
    patterns = ["--pattern", f"+ re:^({wanted})$", "--pattern", "- re:."]
    return ["list", "--format", "{path}{NL}", *patterns, f"{repo.path}::{archive}"]
