"""The run catalogue: entries found by archive (and id), never trusted across ids."""

from __future__ import annotations

import stat
from pathlib import Path

from incus_borg.runs.catalogue import Catalogue

FILES = {"manifest.json": b'{"run": "r1"}\n', "definitions/profiles.yaml": b"- name: default\n"}


def test_an_entry_is_found_by_its_archive_and_id(tmp_path: Path) -> None:
    catalogue = Catalogue.beside(tmp_path / "staging")
    catalogue.store("/srv/repo", "host-2026-12-08T00:00:00", "ab12", FILES)
    assert catalogue.load("/srv/repo", "host-2026-12-08T00:00:00", "ab12") == FILES
    assert catalogue.load("/srv/repo", "host-2026-12-08T00:00:00", None) == FILES


def test_an_entry_of_another_id_or_repository_or_archive_is_a_miss(tmp_path: Path) -> None:
    catalogue = Catalogue.beside(tmp_path / "staging")
    catalogue.store("/srv/repo", "r1", "ab12", FILES)
    assert catalogue.load("/srv/repo", "r1", "cd34") == {}
    assert catalogue.load("/srv/other", "r1", "ab12") == {}
    assert catalogue.load("/srv/repo", "r2", None) == {}


def test_a_damaged_entry_is_a_miss(tmp_path: Path) -> None:
    catalogue = Catalogue.beside(tmp_path / "staging")
    catalogue.store("/srv/repo", "r1", "ab12", FILES)
    entry = catalogue.entry("/srv/repo", "r1")
    for damage in ("{", '{"format": 1, "archive": "r1", "id": "ab12", "files": 3}', "[]"):
        entry.write_text(damage)
        assert catalogue.load("/srv/repo", "r1", "ab12") == {}


def test_entries_are_private_and_forgotten_with_their_archives(tmp_path: Path) -> None:
    catalogue = Catalogue.beside(tmp_path / "staging/")
    assert catalogue.root == tmp_path / "staging.runs"
    catalogue.store("ssh://u@h/./repo", "a/b::c", "ab12", FILES)
    entry = catalogue.entry("ssh://u@h/./repo", "a/b::c")
    assert entry.parent.parent == catalogue.root  # an odd archive name stays one file name
    assert stat.S_IMODE(catalogue.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    catalogue.forget("ssh://u@h/./repo", ["a/b::c", "never-stored"])
    assert not entry.exists()


def test_a_catalogue_that_cannot_be_written_is_no_error(tmp_path: Path) -> None:
    (tmp_path / "staging.runs").write_text("a file where the catalogue would be")
    catalogue = Catalogue.beside(tmp_path / "staging")
    catalogue.store("/srv/repo", "r1", "ab12", FILES)
    assert catalogue.load("/srv/repo", "r1", "ab12") == {}
