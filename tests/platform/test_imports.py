"""Explicit dependencies (docs/architecture.md §2): the modules of `service/` import one another without a cycle
(counting imports made only for type checking, and those inside functions), and each imports on its own in a fresh
interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(SERVICE.rglob("*.py")) if "migrations" not in path.parts}


def imported_by(name: str, path: Path) -> set[str]:
    """The service modules `name` imports, wherever the import statement stands."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return {module for module in found if module in MODULES and module != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as the modules along it (first = last), None when there is none."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                return [*path[path.index(imported) :], imported]
            if imported not in state and (cycle := visit(imported)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_the_service_modules_import_one_another_without_a_cycle() -> None:
    assert len(MODULES) > 60, "the service's modules were not found"
    graph = {name: imported_by(name, path) for name, path in MODULES.items()}
    assert graph["service.runtime"], "the import graph came out empty"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle_through_a_type_only_import() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from service.runtime import Runtime\n"
    fake = ROOT / "tests" / "platform" / "_type_only.py"
    fake.write_text(source, encoding="utf-8")
    try:
        assert imported_by("service.x", fake) == {"service.runtime"}
    finally:
        fake.unlink()


ISOLATED_IMPORTS = """
import importlib, os, sys
import aiohttp, litestar, msgspec, PIL.Image, sqlalchemy, uvicorn  # third-party only: loaded once, shared by forks
failed = []
for name in sys.argv[1:]:
    child = os.fork()
    if child == 0:
        try:
            importlib.import_module(name)
        except BaseException as exc:
            print(name, type(exc).__name__, exc, file=sys.stderr)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    if status != 0:
        failed.append(name)
print(" ".join(failed))
"""
"""Imports each module named in its arguments in a forked child of its own, in which no service module was loaded
before; prints those that failed."""


def test_every_module_imports_on_its_own() -> None:
    modules = sorted(name for name in MODULES if not name.endswith("__main__"))
    done = subprocess.run(
        [sys.executable, "-c", ISOLATED_IMPORTS, *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"modules that do not import on their own: {done.stdout}\n{done.stderr}"
