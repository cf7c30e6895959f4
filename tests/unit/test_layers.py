"""The package's imports go one way: each part imports only the parts below it, and no module
imports itself back through others."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "incus_borg"
# From the bottom up; a part may import the parts of the layers below its own.
LAYERS = [
    {"errors", "__init__", "profile", "yamlio"},
    {"host"},
    {"config", "manifest", "layout", "incus"},
    {"borg", "preflight"},
    {"runs"},
    {"context"},
    {"backup", "restore"},
    {"monitoring"},
    {"actions"},
    {"cli"},
    {"__main__"},
]


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        yield ".".join(parts), path


def imported(name: str, path: Path) -> set[str]:
    """The incus_borg modules (or packages) that a module imports."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = base + (node.module.split(".") if node.module else [])
            elif (node.module or "").startswith("incus_borg"):
                module = str(node.module).split(".")
            else:
                continue
            for alias in node.names:
                whole = ".".join([*module, alias.name])
                known = (PACKAGE.parent / whole.replace(".", "/")).with_suffix(".py").exists()
                found.add(whole if known else ".".join(module))
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("incus_borg")}
    return found


GRAPH = {name: imported(name, path) for name, path in modules()}


def part(module: str) -> str:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def layer(module: str) -> int:
    return next(k for k, names in enumerate(LAYERS) if part(module) in names)


def test_every_part_has_a_layer() -> None:
    assert {part(m) for m in GRAPH} <= set().union(*LAYERS)


def test_parts_import_only_the_layers_below() -> None:
    wrong = [
        f"{m} imports {t}"
        for m, targets in GRAPH.items()
        for t in targets
        if part(t) != part(m) and layer(t) >= layer(m)
    ]
    assert not wrong, wrong


def test_backup_and_restore_never_import_each_other() -> None:
    crossing = [
        (m, t) for m, ts in GRAPH.items() for t in ts if {part(m), part(t)} == {"backup", "restore"}
    ]
    assert not crossing, crossing


def test_no_module_imports_itself_back() -> None:
    state: dict[str, int] = {}  # 1: being visited, 2: done

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH or target == module:
                continue
            if state.get(target) == 1:
                raise AssertionError(" -> ".join([*trail, module, target]))
            if target not in state:
                visit(target, [*trail, module])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])
