"""`--pool-map` parsing, the pool a mapping creates, and devices renamed in backup.yaml.

Pure functions only: no root, no Incus, no borg.
"""

from __future__ import annotations

import pytest
import yaml

from incus_borg.errors import UserError
from incus_borg.restore.poolmap import PoolMap, creation, map_device_pools, parse, parse_one


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fast=nfast", PoolMap("fast", "nfast")),
        ("fast=nfast:btrfs", PoolMap("fast", "nfast", "btrfs")),
        (
            "default=big:zfs:source=tank/incus",
            PoolMap("default", "big", "zfs", {"source": "tank/incus"}),
        ),
        (
            "a=b:btrfs:size=10GiB,btrfs.mount_options=compress=zstd",
            PoolMap("a", "b", "btrfs", {"size": "10GiB", "btrfs.mount_options": "compress=zstd"}),
        ),
        ("old.pool_1=new-pool", PoolMap("old.pool_1", "new-pool")),
    ],
)
def test_parses(text: str, expected: PoolMap) -> None:
    assert parse_one(text) == expected
    assert parse_one(expected.spec) == expected


@pytest.mark.parametrize(
    "text",
    [
        "fast",
        "=nfast",
        "fast=",
        "fast=nfast:",
        "fast=nfast::size=1",
        "a/b=c",
        "a=b c",
        "a=b:dir:size",
    ],
)
def test_refuses_what_is_not_a_map(text: str) -> None:
    with pytest.raises(UserError, match="--pool-map"):
        parse_one(text)


def test_one_pool_mapped_twice_is_refused() -> None:
    with pytest.raises(UserError, match="names pool 'a' twice"):
        parse(["a=b", "a=c"])


def test_two_pools_onto_one_new_pool() -> None:
    both = parse(["a=n", "c=n:dir", "d=n:dir"])
    assert [m.new for m in both.values()] == ["n", "n", "n"]
    with pytest.raises(UserError, match="create pool 'n' differently"):
        parse(["a=n:dir", "c=n:btrfs"])
    with pytest.raises(UserError, match="create pool 'n' differently"):
        parse(["a=n:btrfs:size=1GiB", "c=n:btrfs:size=2GiB"])


def test_a_new_pool_is_like_the_archived_one_without_what_incus_chose() -> None:
    loop = {
        "name": "fast",
        "driver": "btrfs",
        "description": "quick",
        "config": {
            "size": "5GiB",
            "source": "/var/lib/incus/disks/fast.img",
            "volatile.initial_source": "x",
        },
    }
    assert creation(loop, None) == {
        "name": "fast",
        "driver": "btrfs",
        "description": "quick",
        "config": {"size": "5GiB"},
    }
    assert creation(loop, PoolMap("fast", "nfast"))["name"] == "nfast"
    chosen = {"name": "big", "driver": "dir", "config": {"source": "/srv/pool"}}
    assert creation(chosen, None)["config"] == {"source": "/srv/pool"}  # the admin's choice
    implicit = {
        "name": "d",
        "driver": "dir",
        "config": {"source": "/var/lib/incus/storage-pools/d"},
    }
    assert creation(implicit, None)["config"] == {}
    mapped = PoolMap("fast", "nfast", "dir", {"source": "/srv/x"})
    assert creation(loop, mapped) == {
        "name": "nfast",
        "driver": "dir",
        "config": {"source": "/srv/x"},
    }


BACKUP_YAML = b"""container:
  devices:
    data:
      path: /mnt/data
      pool: default
      source: vol
      type: disk
    other:
      path: /mnt/other
      pool: "default2"
      source: vol2
      type: disk
    root:
      path: /
      pool: 'fast'
      type: disk
  created_at: 2024-05-10T03:00:00.123456789Z
pool:
  name: default
  driver: dir
volume:
  name: c1
"""


def test_device_pools_are_renamed_as_text() -> None:
    mapped = map_device_pools(BACKUP_YAML, {"default": "bpool", "fast": "nfast"})
    data = yaml.safe_load(mapped)
    devices = data["container"]["devices"]
    assert devices["data"]["pool"] == "bpool"
    assert devices["root"]["pool"] == "nfast"
    assert devices["other"]["pool"] == "default2"  # another pool, a longer name
    assert data["pool"]["name"] == "default"  # the pool section is Incus's to rewrite
    assert b"created_at: 2024-05-10T03:00:00.123456789Z\n" in mapped  # untouched as text
    assert map_device_pools(BACKUP_YAML, {}) == BACKUP_YAML
