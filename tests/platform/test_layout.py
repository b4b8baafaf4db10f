"""The layout rules for the database (docs/architecture.md §1 and §5): only a domain's `repository.py` and
`service/db/` query it, and neither an endpoint nor a repository opens a transaction.

Every module under `service/` is parsed (not imported) and checked. Outside the SQL homes a module may
- import nothing from SQLAlchemy (a broken constraint is `IntegrityViolation` of `service/db/engine.py`);
- import mapped classes from `service.db.models` only to name them in type annotations (never the tables, the column
  types or `Base`, and never the module itself);
- never call a statement runner: `.execute()`, `.scalar()`, `.scalars()`, `.rows()`, `.fetch_one()`, … .
"""

from __future__ import annotations

import ast
from pathlib import Path

from service.db import models

SERVICE = Path(__file__).resolve().parents[2] / "service"
# `.stream()` is left out: storage and the enhancer stream too, and a session's stream needs a statement built with
# SQLAlchemy, which the import rule already refuses.
STATEMENT_RUNNERS = {
    "execute",
    "executemany",
    "exec_driver_sql",
    "scalar",
    "scalars",
    "rows",
    "first",
    "stream_scalars",
    "fetch_one",
    "insert_ignoring_conflicts",
}
MODELS_MODULE = "service.db.models"
MAPPED_CLASSES = {mapper.class_.__name__ for mapper in models.Base.registry.mappers}


def is_sql_home(path: Path) -> bool:
    relative = path.relative_to(SERVICE)
    return relative.parts[0] == "db" or path.name == "repository.py"


def _annotation_nodes(tree: ast.AST) -> set[int]:
    """The ids of every node inside a type annotation of the module."""
    annotations: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            arguments = node.args
            every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg, arguments.kwarg]
            annotations += [argument.annotation for argument in every if argument and argument.annotation]
            if node.returns is not None:
                annotations.append(node.returns)
    return {id(inner) for annotation in annotations for inner in ast.walk(annotation)}


def sql_outside_repositories(source: str, name: str) -> list[str]:
    """Each place in `source` (the module file `name`) that reaches the database without a repository, as
    `name:line: what`."""
    tree = ast.parse(source, filename=name)
    found: list[tuple[int, str]] = []
    models_imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "sqlalchemy" or alias.name.startswith("sqlalchemy."):
                    found.append((node.lineno, f"imports {alias.name}"))
                elif alias.name == MODELS_MODULE:
                    found.append((node.lineno, f"imports {MODELS_MODULE}"))
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            module = node.module
            if module == "sqlalchemy" or module.startswith("sqlalchemy."):
                found += [(node.lineno, f"imports `{alias.name}` from {module}") for alias in node.names]
            elif module == "service.db" and any(alias.name == "models" for alias in node.names):
                found.append((node.lineno, f"imports {MODELS_MODULE}"))
            elif module == MODELS_MODULE:
                for alias in node.names:
                    if alias.name in MAPPED_CLASSES:
                        models_imported.add(alias.asname or alias.name)
                    else:
                        found.append((node.lineno, f"imports `{alias.name}` from {MODELS_MODULE}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in STATEMENT_RUNNERS:
                found.append((node.lineno, f"calls .{node.func.attr}()"))
        elif isinstance(node, ast.Attribute) and node.attr in {"__table__", "__mapper__"}:
            found.append((node.lineno, f"reads .{node.attr}"))
    in_annotations = _annotation_nodes(tree)
    found += [
        (node.lineno, f"uses the model `{node.id}` outside a type annotation")
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and node.id in models_imported and id(node) not in in_annotations
    ]
    return [f"{name}:{line}: {what}" for line, what in sorted(found)]


def test_sql_lives_only_in_repositories_and_the_db_package() -> None:
    modules = sorted(path for path in SERVICE.rglob("*.py") if not is_sql_home(path))
    assert len(modules) > 40, "the service's modules were not found"
    problems = [
        problem
        for path in modules
        for problem in sql_outside_repositories(path.read_text(encoding="utf-8"), str(path.relative_to(SERVICE.parent)))
    ]
    assert not problems, "SQL outside a repository.py or service/db/:\n" + "\n".join(problems)


def test_every_repository_and_the_db_package_are_the_sql_homes() -> None:
    homes = sorted(str(path.relative_to(SERVICE)) for path in SERVICE.rglob("*.py") if is_sql_home(path))
    assert "tasks/repository.py" in homes and "db/engine.py" in homes
    assert "cors.py" not in homes and "tasks/service.py" not in homes


def test_the_check_names_each_way_of_reaching_the_database() -> None:
    source = "\n".join(
        [
            "from sqlalchemy import select, text",
            "from sqlalchemy.exc import IntegrityError",
            "from sqlalchemy.ext.asyncio import AsyncSession",
            "from service.db.models import TASKS, Task",
            "import sqlalchemy.orm",
            "async def f(session: AsyncSession, task: Task) -> list[Task]:",
            "    await session.execute(select(Task))",
            "    rows = await statements.rows(QUERY, {})",
            "    return [Task(id='x')]",
            "table = Task.__table__",
        ]
    )
    assert sql_outside_repositories(source, "service/x.py") == [
        "service/x.py:1: imports `select` from sqlalchemy",
        "service/x.py:1: imports `text` from sqlalchemy",
        "service/x.py:2: imports `IntegrityError` from sqlalchemy.exc",
        "service/x.py:3: imports `AsyncSession` from sqlalchemy.ext.asyncio",
        "service/x.py:4: imports `TASKS` from service.db.models",
        "service/x.py:5: imports sqlalchemy.orm",
        "service/x.py:7: calls .execute()",
        "service/x.py:7: uses the model `Task` outside a type annotation",
        "service/x.py:8: calls .rows()",
        "service/x.py:9: uses the model `Task` outside a type annotation",
        "service/x.py:10: reads .__table__",
        "service/x.py:10: uses the model `Task` outside a type annotation",
    ]


TRANSACTION_OPENERS = {"transaction", "snapshot", "statement"}


def transactions_opened(source: str, name: str) -> list[str]:
    """Each place in `source` that opens a unit of work (`db.transaction()`, `db.snapshot()`, `db.statement()`), as
    `name:line`."""
    tree = ast.parse(source, filename=name)
    return [
        f"{name}:{node.lineno}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in TRANSACTION_OPENERS
        and not node.args
    ]


def test_endpoints_and_repositories_never_open_a_transaction() -> None:
    """The owner of a unit of work opens it: a service entry point, or a guard that reads before the handler runs.
    An endpoint calls a service; a repository runs statements in the transaction it is given."""
    modules = sorted(path for path in SERVICE.rglob("*.py") if path.name in {"endpoints.py", "repository.py", "app.py"})
    assert len(modules) > 10, "the service's modules were not found"
    opened = [
        place
        for path in modules
        for place in transactions_opened(path.read_text(encoding="utf-8"), str(path.relative_to(SERVICE.parent)))
    ]
    assert not opened, "transactions opened by an endpoint or a repository:\n" + "\n".join(opened)


def test_endpoints_reach_the_database_only_through_services() -> None:
    importing = [
        str(path.relative_to(SERVICE.parent))
        for path in sorted(SERVICE.rglob("endpoints.py"))
        if "repository"
        in {
            alias.name
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.ImportFrom)
            for alias in node.names
        }
    ]
    assert not importing, f"endpoints importing a repository: {importing}"


def test_the_transaction_check_finds_each_opening() -> None:
    source = "async def f(db):\n    async with db.transaction() as tx, db.snapshot() as rx:\n        pass\n"
    assert transactions_opened(source, "service/x/endpoints.py") == [
        "service/x/endpoints.py:2",
        "service/x/endpoints.py:2",
    ]
