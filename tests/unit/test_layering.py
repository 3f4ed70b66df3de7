"""The layering rules of the design, checked on every module's imports (parsed, not run).

Each top-level package may import only what its row of the layout table allows. Handlers reach
the write side through its port (`commands.port`: a ticket snapshot and the commands they send),
never through an aggregate; the query API reads read models, never the write model; there are
no cycles between the top-level packages; and nothing imports `ticketflow` (the composition
root) but entry points, tests and benchmarks.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PACKAGES = (
    "commands",
    "identity",
    "security",
    "streams",
    "handlers",
    "inference",
    "projections",
    "read_api",
    "migrations",
    "ticketflow",
)
"""Top-level packages of the project (the layout table), in no particular order."""

ALLOWED: dict[str, tuple[str, ...]] = {
    "streams": (),
    "inference": (),
    "migrations": (),
    "projections": ("streams.contract",),
    "handlers": ("commands.port", "inference", "streams.contract"),
    "read_api": ("streams.contract", "inference", "security"),
    "security": ("streams.contract",),
    "commands": ("streams.contract", "security"),
    "identity": (
        "streams.contract",
        "security",
        # The write side's shared helpers, and what a tenant's retention purge records.
        "commands.events",
        "commands.conflicts",
        "commands.errors",
        "commands.tracing",
        "commands.documents",
        "commands.service",
    ),
}
"""What each package may import from the other top-level packages (module prefixes)."""

PORT = "commands.port"


@dataclass(frozen=True)
class Import:
    module: str
    """The importing module, dotted."""
    target: str
    """The imported module, dotted (for `from a import b`, `a.b` when `a.b` is a module)."""
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(package: str) -> Iterator[Import]:
    """Every import of another project module in `package`, at any depth of the code."""
    for path in sorted((ROOT / package).rglob("*.py")):
        module = module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".")
                    if path.name != "__init__.py":
                        anchor = anchor[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [_submodule(base, alias.name) for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] in PACKAGES:
                    yield Import(module, target, node.lineno)


def external_imports(module: str) -> set[str]:
    """The modules outside the project that `module` imports."""
    path = ROOT / Path(*module.split("."))
    source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return {name for name in found if name.split(".", maxsplit=1)[0] not in PACKAGES}


def _submodule(base: str, name: str) -> str:
    """`a.b` for `from a import b` when `b` is a module or package of the project, else `a`."""
    candidate = ROOT / Path(*base.split("."), name)
    if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
        return f"{base}.{name}"
    return base


def top(module: str) -> str:
    return module.split(".", maxsplit=1)[0]


def within(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


ALL_IMPORTS = [i for package in PACKAGES for i in project_imports(package)]


def test_the_scan_sees_the_imports_it_checks() -> None:
    # A scanner that finds nothing would pass every rule below.
    seen = {(top(i.module), top(i.target)) for i in ALL_IMPORTS}
    assert ("handlers", "inference") in seen
    assert ("ticketflow", "commands") in seen
    assert ("read_api", "streams") in seen


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_what_its_row_allows(package: str) -> None:
    refused = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in ALL_IMPORTS
        if top(i.module) == package
        and top(i.target) != package
        and not any(within(i.target, allowed) for allowed in ALLOWED[package])
    ]
    assert refused == [], f"{package}/ may import only {ALLOWED[package]}"


def test_handlers_reach_the_write_side_only_through_its_port() -> None:
    refused = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in ALL_IMPORTS
        if top(i.module) == "handlers" and top(i.target) in ("commands", "identity")
        if not within(i.target, PORT)
    ]
    assert refused == []


def test_the_port_leads_to_no_aggregate() -> None:
    # What handlers import of the write side must not bring an aggregate with it: no module the
    # port imports, directly or not, knows the event-sourcing library.
    reached, todo = set(), [PORT]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo += [i.target for i in ALL_IMPORTS if i.module == module]
    assert {"commands.port", "commands.messages", "streams.contract"} <= reached
    aggregates = [
        module
        for module in sorted(reached)
        if any(within(target, "eventsourcing") for target in external_imports(module))
    ]
    assert aggregates == []


def test_the_query_api_never_imports_the_write_model() -> None:
    refused = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in ALL_IMPORTS
        if top(i.module) == "read_api" and top(i.target) in ("commands", "identity")
    ]
    assert refused == []


def test_nothing_imports_the_composition_root() -> None:
    refused = [
        f"{i.module}:{i.line} imports {i.target}"
        for i in ALL_IMPORTS
        if top(i.module) != "ticketflow" and top(i.target) == "ticketflow"
    ]
    assert refused == []


def test_no_cycles_between_top_level_packages() -> None:
    graph: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for i in ALL_IMPORTS:
        if top(i.module) != top(i.target):
            graph[top(i.module)].add(top(i.target))
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        for following in sorted(graph[node]):
            if following in path:
                cycle = [*path[path.index(following) :], following]
                if min(cycle[:-1]) == cycle[0]:  # each cycle once, from its smallest member
                    cycles.append(cycle)
            else:
                visit(following, [*path, following])

    for package in PACKAGES:
        visit(package, [package])
    assert cycles == []
