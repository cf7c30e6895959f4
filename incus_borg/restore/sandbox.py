"""Scratch projects on the production server, where `check --restore-test` imports a run's
instances without touching anything of the admin's.

One scratch project per archived project, so that same-named instances of two projects never
meet. It shares the default project's images and networks. It has profiles of its own when
the archived project had them (copies of the archived ones, which its instances name), and
custom volumes of its own when the archived project had them (empty ones of the names its
instances' disks name: the test compares root filesystems only). Everything made here is
recorded as it is made and removed at the end, and nothing else is ever removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..incus import Incus
from ..manifest import Item
from .source import Source, definitions

# What a scratch project takes from its archived project, with Incus's default for each.
OWN_FEATURES = {"features.profiles": "false", "features.storage.volumes": "true"}


@dataclass
class ScratchProjects:
    """The scratch projects of one restore test, and what was made in them."""

    incus: Incus
    source: Source
    prefix: str = field(default_factory=lambda: f"incus-borg-check-{time.strftime('%Y%m%d%H%M%S')}")
    projects: dict[str, str] = field(default_factory=dict)  # archived -> scratch project
    profiles: list[tuple[str, str]] = field(default_factory=list)  # (project, name)
    volumes: list[tuple[str, str, str]] = field(default_factory=list)  # (pool, project, name)

    def for_item(self, item: Item) -> str:
        """The scratch project an archived instance is imported into, made when needed,
        with the custom volumes of its own project that the instance's disks name."""
        archived = self._archived(item.project)
        own = self._own(archived)
        if item.project not in self.projects:
            self._create(item.project, archived, own)
        project = self.projects[item.project]
        if own.get("features.storage.volumes") == "true":
            self._volumes_for(item, project)
        return project

    def remove(self) -> None:
        """Delete every instance left in the scratch projects, then what was made."""
        for project in self.projects.values():
            for name in self.incus.entity_names("instances", project):
                self.incus.delete_instance(project, name)
        for pool, project, name in self.volumes:
            self.incus.delete_custom_volume(pool, project, name)
        for project, name in self.profiles:
            self.incus.delete_entity("profiles", project, name)
        for project in self.projects.values():
            self.incus.delete_project(project)

    def _archived(self, project: str) -> dict[str, Any]:
        found = [p for p in definitions(self.source, "projects") if p["name"] == project]
        return found[0] if found else {"name": project}

    @staticmethod
    def _own(archived: dict[str, Any]) -> dict[str, str]:
        """The features an archived project had of its own (none for the default project,
        whose own entities the scratch project shares)."""
        if archived["name"] == "default":
            return {}
        config = archived.get("config") or {}
        return {key: str(config.get(key, default)) for key, default in OWN_FEATURES.items()}

    def _create(self, project: str, archived: dict[str, Any], own: dict[str, str]) -> None:
        name = f"{self.prefix}-{len(self.projects) + 1}"
        shared = {"features.images": "false", "features.networks": "false"}
        features = shared | {key: own.get(key, "false") for key in OWN_FEATURES}
        self.incus.create_entity("projects", None, {"name": name, "config": features})
        self.projects[project] = name
        if own.get("features.profiles") != "true":
            return
        for profile in definitions(self.source, "profiles"):
            if profile.get("project") != project:
                continue
            fields = ("description", "config", "devices")
            body: dict[str, Any] = {k: profile[k] for k in fields if k in profile}
            if profile["name"] == "default":  # Incus made it with the project
                self.incus.update_entity("profiles", name, "default", body)
                continue
            self.profiles.append((name, profile["name"]))
            self.incus.create_entity("profiles", name, {"name": profile["name"], **body})

    def _volumes_for(self, item: Item, project: str) -> None:
        """Empty custom volumes of the names the instance's disks name, as archived."""
        instances = definitions(self.source, "instances")
        found = [i for i in instances if (i.get("project"), i["name"]) == (item.project, item.name)]
        devices = (found[0].get("expanded_devices") or {}) if found else {}
        kinds = {
            (v["pool"], v["name"]): v.get("content_type", "filesystem")
            for v in definitions(self.source, "storage-volumes")
            if v.get("project") == item.project
        }
        for device in devices.values():
            if (
                device.get("type") != "disk"
                or not device.get("pool")
                or "/" in device.get("source", "/")
            ):
                continue
            key = (device["pool"], device["source"])
            if key in kinds and (key[0], project, key[1]) not in self.volumes:
                self.volumes.append((key[0], project, key[1]))
                self.incus.create_custom_volume(key[0], project, key[1], kinds[key])
