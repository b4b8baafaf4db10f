"""The OpenAI-compatible facade: `/v1/images/generations`, `/v1/images/edits` and `/v1/models` in the shape of the
OpenAI Images API, so that the official SDKs work with a tenant's key; each request is an ordinary task."""
