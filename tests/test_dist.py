"""The wheel is all a user needs: built with the standard `build` frontend (sdist, then the
wheel from the sdist, as `make dist` does), installed into a fresh venv that holds nothing
else, and run from there: versions, help, configuration, hooks, and a backup.

Every command runs the installed copy with a clean environment (no PYTHONPATH, no repository
on PATH, not run from the repository), so that nothing of the source tree can stand in for
what the wheel left out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest
from cli import incus_config
from harness.server import IncusServer

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
DIST = f"incus_borg-{VERSION}"
INSTANCE = "dist-c1"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
LEFTOVERS = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")
NO_SOURCE = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def repository_files(folder: str, pattern: str = "*") -> list[str]:
    """The files under ROOT/folder (relative to it), without caches."""
    return sorted(
        str(p.relative_to(ROOT / folder))
        for p in (ROOT / folder).rglob(pattern)
        if p.is_file() and "__pycache__" not in p.parts
    )


@dataclass
class Installed:
    """incus-borg installed from the wheel into a venv of its own."""

    venv: Path
    work: Path  # an empty directory to run in

    def run(
        self, program: str, *args: str, input: str | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """Run <venv>/bin/PROGRAM with only the venv and the system directories on PATH."""
        clean = {
            "PATH": f"{self.venv / 'bin'}:{SYSTEM_PATH}",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
        }
        return subprocess.run(
            [str(self.venv / "bin" / program), *args],  # PROGRAM may also be a full path
            input=input,
            capture_output=True,
            text=True,
            env=clean | env,
            cwd=self.work,
            timeout=600,
            check=False,
        )

    def ok(self, program: str, *args: str, **env: str) -> str:
        """Run it; assert exit 0 and return stdout."""
        done = self.run(program, *args, **env)
        assert done.returncode == 0, (program, args, done.stdout, done.stderr)
        return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist and wheel, as `make dist` builds them."""
    out = tmp_path_factory.mktemp("dist")
    # From a copy without what earlier builds left (setuptools keeps every file that a stale
    # *.egg-info/SOURCES.txt lists).
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*LEFTOVERS))
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """A fresh venv holding the wheel and what it depends on, nothing else. borgbackup is held
    to the version this test runs with, so that pip reuses the wheel it built for it (a
    constraint, not a requirement: nothing is installed that the wheel does not ask for)."""
    root = tmp_path_factory.mktemp("fresh")
    venv = root / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", str(venv)], env=NO_SOURCE, check=True, timeout=300
    )
    constraints = root / "constraints.txt"
    constraints.write_text(f"borgbackup=={version('borgbackup')}\n")
    pip = [str(venv / "bin" / "pip"), "install", "-q", "-c", str(constraints)]
    done = subprocess.run(
        [*pip, str(dist / f"{DIST}-py3-none-any.whl")],
        capture_output=True,
        text=True,
        env=NO_SOURCE,  # a source tree on PYTHONPATH would look installed to pip
        cwd=root,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (root / "work").mkdir()
    return Installed(venv, root / "work")


def test_wheel_carries_every_module_hook_and_example(dist: Path) -> None:
    with zipfile.ZipFile(dist / f"{DIST}-py3-none-any.whl") as wheel:
        names = set(wheel.namelist())
    modules = repository_files("incus_borg", "*.py")
    assert [m for m in modules if f"incus_borg/{m}" not in names] == []
    hooks = repository_files("hooks")
    assert hooks == ["incus-borg-post", "incus-borg-pre"]
    assert [h for h in hooks if f"{DIST}.data/scripts/{h}" not in names] == []
    share = f"{DIST}.data/data/share/incus-borg/examples"
    examples = repository_files("examples")
    assert examples and [e for e in examples if f"{share}/{e}" not in names] == []
    with tarfile.open(dist / f"{DIST}.tar.gz") as sdist:
        members = {m.name.removeprefix(f"{DIST}/") for m in sdist.getmembers()}
    wanted = ["CHANGELOG.md", "README.md", "Makefile", *(f"hooks/{h}" for h in hooks)]
    wanted += [f"examples/{e}" for e in examples] + ["tests/conftest.py", "tests/harness/incusd.py"]
    wanted += ["mkdocs.yml", "bench/README.md", *(f"docs/{d}" for d in repository_files("docs"))]
    assert [w for w in wanted if w not in members] == []


def test_installed_version_and_help(installed: Installed) -> None:
    lines = installed.ok("incus-borg", "--version").splitlines()
    assert lines[0] == f"incus-borg {VERSION}"
    assert lines[1] == f"borg {version('borgbackup')} ({installed.venv / 'bin' / 'borg'})"
    assert lines[2].startswith("incus ")
    usage = installed.ok("incus-borg", "--help")
    for command in ("backup", "hook", "restore", "list", "prune", "check", "config", "init"):
        assert f"  {command} " in usage


def test_installed_config_generate_validates(installed: Installed) -> None:
    sample = installed.ok("incus-borg", "config", "generate")
    checked = installed.run("incus-borg", "config", "validate", "-", input=sample)
    assert (checked.returncode, checked.stdout) == (0, "standard input: valid\n"), checked.stderr
    (installed.work / "config.yaml").write_text(sample)
    assert installed.ok("incus-borg", "config", "validate", "config.yaml") == "config.yaml: valid\n"


def test_installed_examples_are_the_repository_s(installed: Installed) -> None:
    share = installed.venv / "share" / "incus-borg" / "examples"
    for name in repository_files("examples"):
        assert (share / name).read_bytes() == (ROOT / "examples" / name).read_bytes(), name


@pytest.fixture(scope="module")
def instance(incus_server: IncusServer) -> Iterator[str]:
    """One small stopped container to back up with the installed copy."""
    incus_server.launch(INSTANCE, files={"/root/f": (b"dist\n", 0, 0, 0o600)}, start=False)
    yield INSTANCE
    incus_server.delete(INSTANCE)


def test_installed_hooks_run_the_installed_incus_borg(
    installed: Installed, incus_server: IncusServer, instance: str, tmp_path: Path
) -> None:
    config = incus_config(incus_server, tmp_path, instances=[instance])
    own = str(installed.venv / "bin" / "incus-borg")
    for hook, words in (
        ("incus-borg-pre", "Lay out the staging tree"),
        ("incus-borg-post", "Release"),
    ):
        # The repository's hooks/ against the installed copy, as the examples run them.
        done = installed.run(str(ROOT / "hooks" / hook), "--help", INCUS_BORG=own)
        assert done.returncode == 0 and words in done.stderr, done.stderr
        # The installed hooks, with no INCUS_BORG and no incus-borg on PATH: the one beside.
        done = installed.run(hook, "--help", PATH=SYSTEM_PATH)
        assert done.returncode == 0 and words in done.stderr, done.stderr
    done = installed.run("incus-borg-pre", str(config), PATH=SYSTEM_PATH)
    try:
        assert done.returncode == 0, done.stderr
        assert "read as it is" in done.stderr
        manifest = json.loads((tmp_path / "staging" / "manifest.json").read_text())
        assert manifest["incus_borg_version"] == VERSION
        assert [i["name"] for i in manifest["instances"]] == [instance]
    except BaseException:  # a failing test leaves nothing mounted
        installed.run("incus-borg-post", str(config), "--failed", PATH=SYSTEM_PATH)
        raise
    done = installed.run("incus-borg-post", str(config), PATH=SYSTEM_PATH)
    assert done.returncode == 0 and "released every quiesce" in done.stderr, done.stderr
    assert not (tmp_path / "staging" / "manifest.json").exists()


def test_installed_backup_records_its_version(
    installed: Installed, incus_server: IncusServer, instance: str, tmp_path: Path
) -> None:
    config = str(incus_config(incus_server, tmp_path, instances=[instance]))
    server_version = incus_server.daemon.query("/1.0")["environment"]["server_version"]
    versions = installed.ok("incus-borg", "-c", config, "--version").splitlines()
    assert versions[2] == f"incus {server_version} ({incus_server.daemon.incus_dir})"
    installed.ok("incus-borg", "-c", config, "init")
    installed.ok("incus-borg", "-c", config, "backup")
    listing = installed.ok("incus-borg", "-c", config, "list", "latest")
    assert f"written by incus-borg {VERSION}" in listing
    assert f" {instance} " in listing
