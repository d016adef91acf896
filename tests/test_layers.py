"""The package's floors, read from its own imports (ast): no cycle, every import points down
or stays on its floor, and no technique family imports another family or the CLI.

Every ``import`` counts, also those inside functions and under ``TYPE_CHECKING``: a lazy
import hides a dependency from the interpreter, not from the design.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "slimkit"

#: floor of each top-level module or package of slimkit (0: ground ... 3: top)
FLOORS: dict[str, int] = {
    # ground: configs, recipes, selection, errors, file writes, the compressed-layer base
    **dict.fromkeys(
        (
            "_version",
            "errors",
            "config",
            "select",
            "data",
            "recipe",
            "registry",
            "spec_rules",
            "constructible",
            "compressed",
            "atomic",
            "cpu",
        ),
        0,
    ),
    # middle: what every technique may use and that uses no technique
    **dict.fromkeys(
        (
            "context",
            "model_info",
            "calib",
            "formats",
            "layers",
            "train",
            "tasks",
            "io",
            "evaluate",
            "deploy",
            "pipeline",
        ),
        1,
    ),
    # families: one technique each; the middle and the ground only, never a sibling
    **dict.fromkeys(("quant", "prune", "distill", "factorize", "separable", "nas", "encode"), 2),
    # top: makes the techniques known, and the user's entry points
    **dict.fromkeys(("builtin", "api", "cli", "report", "__init__", "__main__"), 3),
}
FAMILY = 2

#: imports that point up a floor, each with its reason (at most 5)
ALLOWED_UP: dict[tuple[str, str], str] = {
    ("slimkit.registry", "slimkit.context"): (
        "type annotation only (under TYPE_CHECKING): a handler's signature names Context"
    ),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(name: str) -> str | None:
    """The slimkit module ``name`` (or its longest existing prefix) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imported(module: str, path: Path) -> Iterator[str]:
    """Every slimkit module ``module`` imports, anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "slimkit":
                found = resolve(target)
                if found is not None and found != module:
                    yield found


EDGES: dict[str, set[str]] = {m: set(imported(m, p)) for m, p in MODULES.items()}


def room(module: str) -> str:
    """The top-level module or package of slimkit that ``module`` belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def floor(module: str) -> int:
    return FLOORS[room(module)]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_module_has_a_floor() -> None:
    assert sorted({room(m) for m in MODULES} - set(FLOORS)) == []


def test_the_reader_sees_known_imports() -> None:
    # the reader itself can fail: it must find imports of each kind it claims to read
    assert "slimkit.errors" in EDGES["slimkit.config"]  # top-level from-import
    assert "slimkit.tasks.base" in EDGES["slimkit.pipeline"]  # under TYPE_CHECKING
    assert "slimkit.quant.gptq" in EDGES["slimkit.builtin"]  # plain import
    assert "slimkit.formats.packing" in EDGES["slimkit.formats.affine"]  # `from pkg import mod`


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    assert cycles(EDGES) == []


def upward() -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in EDGES.items() for b in targets if floor(b) > floor(a))


def test_imports_point_down_except_the_listed_ones() -> None:
    assert len(ALLOWED_UP) <= 5
    assert [edge for edge in upward() if edge not in ALLOWED_UP] == []


def test_every_allowed_exception_is_still_needed() -> None:
    assert sorted(set(ALLOWED_UP) - set(upward())) == []


@pytest.mark.parametrize("family", sorted(r for r, f in FLOORS.items() if f == FAMILY))
def test_a_family_imports_no_other_family_and_not_the_cli(family: str) -> None:
    wrong = sorted(
        (a, b)
        for a, targets in EDGES.items()
        if room(a) == family
        for b in targets
        if (floor(b) == FAMILY and room(b) != family) or floor(b) > FAMILY
    )
    assert wrong == []


def test_registry_pipeline_and_io_import_no_technique() -> None:
    lower = [m for m in EDGES if room(m) in ("registry", "pipeline", "io")]
    assert lower
    assert sorted((a, b) for a in lower for b in EDGES[a] if floor(b) >= FAMILY) == []


def test_only_the_entry_point_imports_the_cli() -> None:
    users = sorted(a for a, targets in EDGES.items() if "slimkit.cli" in targets)
    assert users == ["slimkit.__main__"]
