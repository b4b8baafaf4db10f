"""The ledger audit: checks the invariants of DESIGN §3 against the database and counts any credit lost or doubled.

For every tenant, balance = sum of its ledger entries. For every task, exactly one debit equal to its cost; a failed or
cancelled task exactly one refund equal to its cost; a completed task a refund only for images it did not deliver.
Run it with `imagegen audit`; the soak benchmark and the crash tests use it too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import case, func, select

from service.db.engine import Database
from service.db.models import LedgerEntry, Task, Tenant


@dataclass
class AuditReport:
    tasks_by_status: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    granted: int = 0
    debited: int = 0
    refunded: int = 0
    expected_balance: int = 0
    actual_balance: int = 0
    lost_credits: int = 0
    doubled_credits: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def unfinished(self) -> int:
        return self.tasks_by_status["queued"] + self.tasks_by_status["running"]

    @property
    def clean(self) -> bool:
        return not self.problems and self.lost_credits == 0 and self.doubled_credits == 0

    def lines(self) -> list[str]:
        statuses = ", ".join(f"{status} {count}" for status, count in sorted(self.tasks_by_status.items()))
        errors = ", ".join(f"{code} {count}" for code, count in self.errors.most_common())
        return [
            f"tasks by status:   {statuses or 'none'}",
            f"errors by code:    {errors or 'none'}",
            f"retries:           {self.retries}",
            f"credits granted:   {self.granted}",
            f"credits debited:   {self.debited}",
            f"credits refunded:  {self.refunded}",
            f"balance expected:  {self.expected_balance}",
            f"balance actual:    {self.actual_balance}",
            f"lost credits:      {self.lost_credits}",
            f"doubled credits:   {self.doubled_credits}",
            *(f"problem: {problem}" for problem in self.problems[:50]),
        ]


def expected_refund(task: Task) -> int | None:
    """What a finished task must have been refunded; None while it is not finished."""
    if task.status in ("failed", "cancelled"):
        return task.cost
    if task.status == "completed":
        per_image = (task.cost - task.enhance_cost) // task.n
        return per_image * (task.n - len(task.images))
    return None


async def audit_ledger(db: Database) -> AuditReport:
    report = AuditReport()
    async with db.read() as session:
        tasks = list(await session.scalars(select(Task)))
        entries = (
            await session.execute(
                select(LedgerEntry.task_id, LedgerEntry.kind, func.count(), func.sum(LedgerEntry.amount))
                .where(LedgerEntry.task_id.is_not(None))
                .group_by(LedgerEntry.task_id, LedgerEntry.kind)
            )
        ).all()
        sums = (
            await session.execute(
                select(
                    func.coalesce(
                        func.sum(case((LedgerEntry.kind.in_(("grant", "adjust")), LedgerEntry.amount), else_=0)), 0
                    ),
                    func.coalesce(func.sum(case((LedgerEntry.kind == "debit", -LedgerEntry.amount), else_=0)), 0),
                    func.coalesce(func.sum(case((LedgerEntry.kind == "refund", LedgerEntry.amount), else_=0)), 0),
                )
            )
        ).one()
        balances = (
            await session.execute(
                select(Tenant.id, Tenant.balance, func.coalesce(func.sum(LedgerEntry.amount), 0))
                .outerjoin(LedgerEntry, LedgerEntry.tenant_id == Tenant.id)
                .group_by(Tenant.id, Tenant.balance)
            )
        ).all()

    report.granted, report.debited, report.refunded = (int(value) for value in sums)
    for tenant_id, balance, ledger_sum in balances:
        report.actual_balance += int(balance)
        report.expected_balance += int(ledger_sum)
        if balance != ledger_sum:
            report.problems.append(f"tenant {tenant_id}: balance {balance} but its ledger sums to {ledger_sum}")
            difference = int(ledger_sum) - int(balance)
            report.lost_credits += max(difference, 0)
            report.doubled_credits += max(-difference, 0)

    by_task: dict[tuple[str, str], tuple[int, int]] = {
        (str(task_id), kind): (int(count), int(amount)) for task_id, kind, count, amount in entries
    }
    for task in tasks:
        report.tasks_by_status[task.status] += 1
        if task.error_code:
            report.errors[task.error_code] += 1
        report.retries += task.retries
        _check_task(report, task, by_task)
    return report


def _check_task(report: AuditReport, task: Task, by_task: dict[tuple[str, str], tuple[int, int]]) -> None:
    debits, debited = by_task.get((task.id, "debit"), (0, 0))
    refunds, refunded = by_task.get((task.id, "refund"), (0, 0))
    if debits != 1 or -debited != task.cost:
        report.problems.append(f"task {task.id}: {debits} debit(s) of {-debited} for a cost of {task.cost}")
        report.doubled_credits += max(-debited - task.cost, 0)
    if refunds > 1:
        report.problems.append(f"task {task.id}: {refunds} refunds")
    if refunded != task.refunded:
        report.problems.append(f"task {task.id}: refunded {task.refunded} but its ledger refunds {refunded}")
    owed = expected_refund(task)
    if owed is None:
        if refunded:
            report.problems.append(f"task {task.id} is {task.status} yet was refunded {refunded}")
            report.doubled_credits += refunded
        return
    if refunded < owed:
        report.problems.append(f"task {task.id} ({task.status}): refunded {refunded} of the {owed} owed")
        report.lost_credits += owed - refunded
    elif refunded > owed:
        report.problems.append(f"task {task.id} ({task.status}): refunded {refunded}, more than the {owed} owed")
        report.doubled_credits += refunded - owed
