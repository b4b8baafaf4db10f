"""How the repositories scope a tenant's rows to the caller who reads them.

Each table whose rows belong to a tenant (and some to one of its end users) has one function in its domain's
`repository.py`, `owned_<rows>(tenant_id, …)`, that returns the condition a caller's rows meet. Every read of such rows
filters on it, including the statements the hot paths build once as module constants: those pass bound parameters
instead of values. Auditing a table's isolation means reading that one function and its callers.

The pages of a caller's rows, newest first, are built here too (`newest_first`), on the table's scoping function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import BindParameter, ColumnElement, Integer, Select, String, Table, bindparam, select

CallerValue = str | BindParameter[str]
"""A caller's tenant id or end user: the value itself, or the bound parameter a prepared statement fills per call."""


def newest_first(
    table: Table,
    owned: Callable[[CallerValue, CallerValue | None], ColumnElement[bool]],
    *,
    end_user: bool,
    before: bool,
    filters: Iterable[ColumnElement[bool]] = (),
) -> Select[Any]:
    """The statement of a page of a caller's rows of `table`, newest id first, with bound parameters: `tenant_id`,
    `end_user` (an end user's own rows, when `end_user`), `before` (the page after that id, when `before`), `limit`,
    and those of `filters`. A repository builds one per combination of its filters, once; `page_values` gives its
    parameters."""
    statement = select(table).where(owned(bindparam("tenant_id"), bindparam("end_user") if end_user else None))
    if before:
        statement = statement.where(table.c.id < bindparam("before", type_=String()))
    return statement.where(*filters).order_by(table.c.id.desc()).limit(bindparam("limit", type_=Integer()))


def page_values(**values: object) -> dict[str, object]:
    """The parameters of a `newest_first` page: those given, a filter left out (None) left out."""
    return {name: value for name, value in values.items() if value is not None}
