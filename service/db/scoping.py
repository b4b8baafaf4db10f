"""How the repositories scope a tenant's rows to the caller who reads them.

Each table whose rows belong to a tenant (and some to one of its end users) has one function in its domain's
`repository.py`, `owned_<rows>(tenant_id, …)`, that returns the condition a caller's rows meet. Every read of such rows
filters on it, including the statements the hot paths build once as module constants: those pass bound parameters
instead of values. Auditing a table's isolation means reading that one function and its callers.
"""

from __future__ import annotations

from sqlalchemy import BindParameter

CallerValue = str | BindParameter[str]
"""A caller's tenant id or end user: the value itself, or the bound parameter a prepared statement fills per call."""
