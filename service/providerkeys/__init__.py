"""Tenants' own provider keys (BYOK): stored sealed by the keyring, shown only as a hint and a fingerprint, and used
for that tenant's tasks on that upstream instance."""
