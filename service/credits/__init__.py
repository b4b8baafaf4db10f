"""The credits ledger: balances, append-only entries, debits, refunds and grants."""
