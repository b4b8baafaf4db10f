"""The spend guards as rules on what an account holds: which of them refuse a debit of a given cost now.

The guarded debit (`service/credits/repository.py`) enforces the same rules inside its one UPDATE; these functions say
which rule refused when that UPDATE matched no row, and what a quote would meet. Pure functions: no I/O.

Periods are UTC: a day is `YYYY-MM-DD`, a month `YYYY-MM`. An account keeps what it spent in its current period as a
counter and the period it belongs to; a counter of an earlier period counts as nothing spent.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from service.errors import ConfirmRequired, InsufficientCredits, OverMaxCost, OverSpendCap, ServiceError

TENANT = "tenant"
USER = "user"


def day_of(moment: datetime) -> str:
    """The UTC day of `moment`, as the counters name it."""
    return moment.astimezone(UTC).date().isoformat()


def month_of(moment: datetime) -> str:
    """The UTC calendar month of `moment`, as the counters name it."""
    return day_of(moment)[:7]


def next_day(moment: datetime) -> datetime:
    """When the UTC day after `moment`'s begins."""
    return datetime.combine(moment.astimezone(UTC).date() + timedelta(days=1), time(), UTC)


def next_month(moment: datetime) -> datetime:
    """When the UTC calendar month after `moment`'s begins."""
    day = moment.astimezone(UTC).date()
    first = date(day.year + 1, 1, 1) if day.month == 12 else date(day.year, day.month + 1, 1)
    return datetime.combine(first, time(), UTC)


def spent_in(period: str, amount: int, current: str) -> int:
    """What a counter holds for the `current` period: its amount when it is that period's, else nothing."""
    return int(amount) if period == current else 0


def over_max_cost(cost: int, max_cost: int | None) -> OverMaxCost | None:
    """The refusal of a request whose own `max_cost` is below the cost, if it is."""
    return OverMaxCost(cost=cost, max_cost=max_cost) if max_cost is not None and cost > max_cost else None


def refusals(
    tenant: Any, user: Any, *, end_user: str | None, cost: int, now: datetime, confirmed: bool
) -> list[ServiceError]:
    """Every guard of the debit that refuses `cost` now, in the order the submission reports them: the confirmation,
    then the tenant's balance and caps, then the end user's allowance and daily cap.

    `tenant` is the tenant's row (balance, caps, counters, `confirm_above`), `user` the end user's row or None when
    they have none yet (no allowance). An end user is told neither the tenant's balance nor its caps' figures."""
    found = tenant_refusals(tenant, hidden=end_user is not None, cost=cost, now=now, confirmed=confirmed)
    return found + user_refusals(tenant, user, cost=cost, now=now) if end_user is not None else found


def tenant_refusals(tenant: Any, *, hidden: bool, cost: int, now: datetime, confirmed: bool) -> list[ServiceError]:
    """The guards of the tenant's debit that refuse `cost` now: the confirmation, the balance, the daily and the
    monthly cap; with `hidden` (an end user spends), without the tenant's own figures."""
    found: list[ServiceError] = []
    if tenant.confirm_above is not None and cost > tenant.confirm_above and not confirmed:
        found.append(ConfirmRequired(cost=cost, confirm_above=int(tenant.confirm_above)))
    if tenant.balance < cost:
        found.append(InsufficientCredits(balance=None if hidden else int(tenant.balance), cost=cost, account=TENANT))
    day, month = day_of(now), month_of(now)
    caps = (
        ("over_daily_cap", tenant.daily_spend_cap, spent_in(tenant.spent_day, tenant.spent_day_amount, day), next_day),
        (
            "over_monthly_cap",
            tenant.monthly_spend_cap,
            spent_in(tenant.spent_month, tenant.spent_month_amount, month),
            next_month,
        ),
    )
    for code, cap, spent, period_end in caps:
        if cap is not None and spent + cost > cap:
            shown = (None, None) if hidden else (int(cap), spent)
            found.append(OverSpendCap(code, cap=shown[0], spent=shown[1], cost=cost, resets_at=period_end(now)))
    return found


def user_refusals(tenant: Any, user: Any, *, cost: int, now: datetime) -> list[ServiceError]:
    """The guards of an end user's debit that refuse `cost` now: their allowance (`user` None: they have none yet)
    and the tenant's daily cap for each end user."""
    found: list[ServiceError] = []
    allowance = int(user.balance) if user is not None else 0
    if allowance < cost:
        found.append(InsufficientCredits(balance=allowance, cost=cost, account=USER))
    cap = tenant.end_user_daily_spend_cap
    spent = spent_in(user.spent_day, user.spent_day_amount, day_of(now)) if user is not None else 0
    if cap is not None and spent + cost > cap:
        found.append(
            OverSpendCap("over_end_user_daily_cap", cap=int(cap), spent=spent, cost=cost, resets_at=next_day(now))
        )
    return found
