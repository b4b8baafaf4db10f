"""End users of a tenant: the browser tokens a tenant mints for them, and their daily allowance."""
