"""YAML through libyaml, PyYAML's C bindings, where PyYAML was built with them (its wheels
are): a server's definitions run to megabytes, which the pure-Python parser and emitter take
a noticeable part of a second to handle."""

from __future__ import annotations

from typing import Any

import yaml

LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load(text: str | bytes) -> Any:
    """Parse YAML (the safe subset)."""
    return yaml.load(text, Loader=LOADER)


def dump(data: Any, **options: Any) -> str:
    """Emit YAML (the safe subset)."""
    return str(yaml.dump(data, Dumper=DUMPER, **options))
