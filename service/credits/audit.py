"""The ledger audit: checks the invariants of docs/architecture.md §3 against the database, and counts any credit
lost or doubled.

For every tenant, balance = sum of its ledger entries on the tenant account; for every end user, allowance = sum of
their entries on the user account. For every task, exactly one debit equal to its cost; a failed or cancelled task
exactly one refund equal to its cost; a completed task a refund only for images it did not deliver (a task with
candidates paid for each candidate, and delivered each one that passed the quality gate). A task an end user
submitted has the same on the user account as on the tenant account.
Run it with `imagegen audit`; the soak benchmark and the crash tests use it too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from service.credits import repository as ledger
from service.credits.repository import TENANT, USER
from service.db.engine import Database, Record
from service.tasks import repository as tasks_repository


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
    end_users: int = 0
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
            f"end users:         {self.end_users}",
            f"lost credits:      {self.lost_credits}",
            f"doubled credits:   {self.doubled_credits}",
            *(f"problem: {problem}" for problem in self.problems[:50]),
        ]


def expected_refund(task: Record) -> int | None:
    """What a finished task must have been refunded; None while it is not finished."""
    if task.status in ("failed", "cancelled"):
        return int(task.cost)
    if task.status == "completed":
        # Each candidate is an image paid for; every image stored (every candidate that passed) was delivered.
        asked = int(task.n) * int(task.candidates)
        per_image = int(task.cost - task.enhance_cost) // asked
        return per_image * (asked - len(task.images))
    return None


async def audit_ledger(db: Database) -> AuditReport:
    report = AuditReport()
    async with db.snapshot() as tx:
        tasks = await tasks_repository.all_tasks(tx)
        entries = await ledger.entries_by_task(tx)
        sums = await ledger.tenant_account_sums(tx)
        balances = await ledger.tenant_balances_and_sums(tx)
        allowances = await ledger.allowances_and_sums(tx)

    report.granted, report.debited, report.refunded = (int(value) for value in sums)
    for tenant_id, balance, ledger_sum in balances:
        report.actual_balance += int(balance)
        report.expected_balance += int(ledger_sum)
        if balance != ledger_sum:
            report.problems.append(f"tenant {tenant_id}: balance {balance} but its ledger sums to {ledger_sum}")
            difference = int(ledger_sum) - int(balance)
            report.lost_credits += max(difference, 0)
            report.doubled_credits += max(-difference, 0)

    report.end_users = len(allowances)
    for tenant_id, end_user, balance, ledger_sum in allowances:
        if balance != ledger_sum:
            report.problems.append(
                f"end user {end_user} of tenant {tenant_id}: allowance {balance} but its ledger sums to {ledger_sum}"
            )
            difference = int(ledger_sum) - int(balance)
            report.lost_credits += max(difference, 0)
            report.doubled_credits += max(-difference, 0)

    by_task: dict[tuple[str, str, str], tuple[int, int]] = {
        (str(task_id), kind, account): (int(count), int(amount)) for task_id, kind, account, count, amount in entries
    }
    for task in tasks:
        report.tasks_by_status[task.status] += 1
        if task.error_code:
            report.errors[task.error_code] += 1
        report.retries += task.retries
        _check_task(report, task, by_task, TENANT)
        if task.end_user is not None:
            _check_task(report, task, by_task, USER)
        elif any((task.id, kind, USER) in by_task for kind in ("debit", "refund")):
            report.problems.append(f"task {task.id} has no end user yet moved an allowance")
    return report


def _check_task(
    report: AuditReport, task: Record, by_task: dict[tuple[str, str, str], tuple[int, int]], account: str
) -> None:
    """The task's debit and refunds on one account: the tenant's, or the allowance of the end user who submitted it."""
    debits, debited = by_task.get((task.id, "debit", account), (0, 0))
    refunds, refunded = by_task.get((task.id, "refund", account), (0, 0))
    on = "" if account == TENANT else f" on the allowance of {task.end_user}"
    if debits != 1 or -debited != task.cost:
        report.problems.append(f"task {task.id}: {debits} debit(s) of {-debited} for a cost of {task.cost}{on}")
        report.doubled_credits += max(-debited - task.cost, 0)
    if refunds > 1:
        report.problems.append(f"task {task.id}: {refunds} refunds{on}")
    if refunded != task.refunded:
        report.problems.append(f"task {task.id}: refunded {task.refunded} but its ledger refunds {refunded}{on}")
    owed = expected_refund(task)
    if owed is None:
        if refunded:
            report.problems.append(f"task {task.id} is {task.status} yet was refunded {refunded}{on}")
            report.doubled_credits += refunded
        return
    if refunded < owed:
        report.problems.append(f"task {task.id} ({task.status}): refunded {refunded} of the {owed} owed{on}")
        report.lost_credits += owed - refunded
    elif refunded > owed:
        report.problems.append(f"task {task.id} ({task.status}): refunded {refunded}, more than the {owed} owed{on}")
        report.doubled_credits += refunded - owed
