"""`--pool-map`: which pool of this server each archived pool's volumes go to.

`OLD=NEW` puts pool OLD's volumes onto pool NEW (used as it is when it exists, else created
like OLD). `OLD=NEW:DRIVER[:key=value,...]` creates NEW with that driver and configuration
when it does not exist yet.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import UserError

SYNTAX = "OLD=NEW or OLD=NEW:DRIVER[:key=value,...]"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class PoolMap:
    """One archived pool and where its volumes go."""

    old: str
    new: str
    driver: str | None = None  # create `new` with this driver (None: like the archived pool)
    config: dict[str, str] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        """How the admin wrote it."""
        if self.driver is None:
            return f"{self.old}={self.new}"
        pairs = ",".join(f"{k}={v}" for k, v in self.config.items())
        return f"{self.old}={self.new}:{self.driver}" + (f":{pairs}" if pairs else "")


def parse_one(text: str) -> PoolMap:
    """One `--pool-map` value."""
    old, equals, rest = text.partition("=")
    new, _, tail = rest.partition(":")
    driver, _, pairs = tail.partition(":")
    if not equals or not _valid(old) or not _valid(new) or (":" in rest and not driver):
        raise UserError(f"--pool-map {text!r}: write {SYNTAX}")
    config: dict[str, str] = {}
    for pair in filter(None, pairs.split(",")):
        key, has_value, value = pair.partition("=")
        if not has_value or not key:
            raise UserError(f"--pool-map {text!r}: {pair!r} is not key=value")
        config[key] = value
    return PoolMap(old, new, driver or None, config)


def _valid(name: str) -> bool:
    return bool(_NAME.match(name))


def parse(values: Iterable[str]) -> dict[str, PoolMap]:
    """Every `--pool-map`, by archived pool; one pool mapped twice, or two pools mapped onto
    one new pool with different drivers or settings, is refused."""
    maps: dict[str, PoolMap] = {}
    for value in values:
        one = parse_one(value)
        if one.old in maps:
            raise UserError(f"--pool-map names pool {one.old!r} twice: map each pool once")
        maps[one.old] = one
    creating: dict[str, PoolMap] = {}
    for one in maps.values():
        other = creating.setdefault(one.new, one) if one.driver else one
        if (other.driver, other.config) != (one.driver, one.config):
            raise UserError(
                f"--pool-map {other.spec} and {one.spec} create pool {one.new!r} differently: "
                "give its driver and settings once"
            )
    return maps


def default_source(pool: dict[str, Any]) -> bool:
    """Whether an archived pool's `source` is one Incus chose itself below its own directory
    (a `dir` pool's `storage-pools/<name>`, a loop file `disks/<name>.img`): a new server
    chooses its own."""
    source = str((pool.get("config") or {}).get("source", ""))
    name = pool["name"]
    return source.endswith((f"/storage-pools/{name}", f"/disks/{name}.img"))


def creation(pool: dict[str, Any], mapping: PoolMap | None) -> dict[str, Any]:
    """The body that creates the pool an archived pool maps to: the mapping's driver and
    settings, else the archived pool's (without runtime keys, and without a source that
    Incus had chosen itself)."""
    name = mapping.new if mapping else pool["name"]
    if mapping is not None and mapping.driver is not None:
        return {"name": name, "driver": mapping.driver, "config": dict(mapping.config)}
    config = {
        k: v
        for k, v in (pool.get("config") or {}).items()
        if not k.startswith("volatile.") and not (k == "source" and default_source(pool))
    }
    return {
        "name": name,
        "driver": pool["driver"],
        "description": pool.get("description", ""),
        "config": config,
    }


_POOL_LINE = re.compile(rb"^(?P<head>[ \t]+pool:[ \t]*)(?P<value>[^\n#]*?)[ \t]*$", re.M)


def map_device_pools(text: bytes, pools: dict[str, str]) -> bytes:
    """An instance's backup.yaml with every device's `pool:` renamed as `pools` says (old ->
    new). It is edited as text: Incus parses its own timestamps, which a YAML round trip
    would rewrite."""
    if not pools:
        return text

    def rename(match: re.Match[bytes]) -> bytes:
        value = yaml.safe_load(match["value"].decode() or "''")
        if not isinstance(value, str) or value not in pools:
            return match[0]
        return match["head"] + yaml.safe_dump(pools[value], default_style='"').strip().encode()

    return _POOL_LINE.sub(rename, text)
