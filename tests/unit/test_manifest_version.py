"""The manifest names the incus-borg that wrote it; manifests of older versions still read."""

from __future__ import annotations

import json

from incus_borg import __version__
from incus_borg.manifest import Manifest

# A format-2 manifest as 0.1.0 wrote it: no incus_borg_version.
OLD = {
    "hostname": "h",
    "run": "h-2026-11-30T03:00:00",
    "created": "2026-11-30T03:00:00",
    "incus_version": "6.0.4",
    "borg_version": "1.4.5",
    "mode": "auto",
    "hook_mode": False,
    "database": "exact",
    "daemon_downtime": 0.9,
    "instances": [],
    "volumes": [],
    "timings": {},
    "partial": False,
    "format": 2,
}


def test_a_manifest_of_0_1_0_reads_without_a_version() -> None:
    assert Manifest.from_json(json.dumps(OLD)).incus_borg_version == ""


def test_the_version_survives_a_round_trip() -> None:
    manifest = Manifest.from_json(json.dumps(OLD | {"incus_borg_version": __version__}))
    assert json.loads(manifest.to_json())["incus_borg_version"] == __version__
