"""Prompt enhancement: system prompts per direction, style presets, the streaming chat client, the cache and the
`/api/prompts/*` routes."""
