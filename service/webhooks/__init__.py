"""Signed webhooks: tenants' endpoints, the outbox written with each event's change, and its delivery."""
