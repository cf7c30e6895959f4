"""Configuration: schema checks, error messages, sample and the documented reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from cli import one_line_error, run_cli

from incus_borg import config

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference" / "configuration.md"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("incus: {dri: /x}\n", "unknown key 'dri' under 'incus'"),
        ("colour: blue\n", "unknown key 'colour'"),
        ("incus: {dir: 5}\n", "'incus.dir' must be a string, got int"),
        ("retention: {keep_daily: yes}\n", "'retention.keep_daily' must be an integer, got bool"),
        (
            "mode: fast\n",
            "'mode' must be one of auto, snapshot, freeze, stop, none, export, got 'fast'",
        ),
        ("repositories: /x\n", "'repositories' must be a list of mappings, got str"),
        ("repositories: [{label: a}]\nincus: [\n", "invalid YAML at line 3"),
        ("repositories: []\n", "'repositories' must list at least one repository"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    error = one_line_error(run_cli("list", config=path))
    assert expected in error
    assert str(path) in error


def test_missing_config_file_says_how_to_create_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    error = one_line_error(run_cli("list", config=missing))
    assert f"config file {missing} does not exist" in error
    assert "incus-borg config generate" in error


def test_unreadable_config_file(tmp_path: Path) -> None:
    error = one_line_error(run_cli("list", config=tmp_path))
    assert f"cannot read config file {tmp_path}" in error


def test_config_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "env.yaml"
    path.write_text("mode: sideways\n")
    error = one_line_error(run_cli("config", "validate", env={"INCUS_BORG_CONFIG": str(path)}))
    assert str(path) in error


def test_generated_sample_is_valid_and_equals_defaults(tmp_path: Path) -> None:
    done = run_cli("config", "generate")
    assert done.returncode == 0, done.stderr
    path = tmp_path / "sample.yaml"
    path.write_text(done.stdout)
    assert run_cli("config", "validate", str(path)).returncode == 0
    assert config.parse(done.stdout, "sample") == config.Config()
    for key in ("repositories", "encryption_passphrase", "stop_command", "keep_monthly"):
        assert key in done.stdout


def test_public_key_names_are_kept() -> None:
    sample = yaml.safe_load(config.sample())
    (repository,) = sample["repositories"]
    assert (repository["path"], repository["label"]) == ("/var/backups/incus-borg", "local")
    assert set(sample["incus"]) == {"dir", "stop_command", "start_command", "subuid", "subgid"}
    assert sample["retention"] == {"keep_daily": 7, "keep_weekly": 4, "keep_monthly": 6}
    for key in ("staging_dir", "mode", "instances"):
        assert key in sample


def test_documented_reference_matches_schema() -> None:
    text = REFERENCE.read_text()
    match = re.search(r"<!-- config-reference -->\n(.*?)<!-- /config-reference -->", text, re.S)
    assert match, f"{REFERENCE} lacks the config-reference markers"
    assert match.group(1) == config.reference(), (
        f"the configuration reference in {REFERENCE} is out of date; replace the table "
        "between its markers with:\n" + config.reference()
    )
