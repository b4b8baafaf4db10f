"""Tenants and their API keys: the admin API, key issuance and revocation, and authentication of callers."""
