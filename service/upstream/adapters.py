"""Adapter types by name. A type is one module that calls `register(name, opener)` when imported; the registry opens
each configured instance with the opener of its `type`. The built-in types register in `tasks_api`, `images_api` and
`offline`; a deployment adds its own through `adapter_modules` in the upstreams file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service.settings import Settings
from service.upstream import task_api_root
from service.upstream.base import ImageUpstream
from service.upstream.http import UpstreamHTTP
from service.upstream_config import InstanceConfig


@dataclass(frozen=True, slots=True)
class Opening:
    """What an opener is given for one instance: its configuration, its key (read from `api_key_env`, None without
    one), the settings, and the process's exit stack for anything it starts besides the adapter (closed by the
    registry)."""

    config: InstanceConfig
    api_key: str | None
    settings: Settings
    stack: contextlib.AsyncExitStack

    @property
    def timeout(self) -> float:
        return self.config.timeout_seconds or self.settings.upstream_timeout

    @property
    def poll_interval(self) -> float:
        return self.config.poll_interval_seconds or self.settings.poll_interval

    def http(self, base_url: str | None = None, api_key: str | None = None) -> UpstreamHTTP:
        """The pooled HTTP client of an instance: its own base URL and key unless given others (an instance the
        process starts itself); the breaker counts whole attempts in the registry, not the client's calls."""
        url = base_url or self.config.base_url
        if url is None:
            raise ValueError(f"instance {self.config.name!r} has no base_url")
        return UpstreamHTTP(
            task_api_root(url),
            api_key or self.api_key,
            timeout=self.timeout,
            connections=max(8, self.config.max_concurrency * 2),
        )


Opener = Callable[[Opening], Awaitable[ImageUpstream]]
_TYPES: dict[str, Opener] = {}


def register(type_name: str, opener: Opener) -> None:
    """Make `type_name` usable as an instance's `type`; registering one name twice is a mistake and refused."""
    if type_name in _TYPES and _TYPES[type_name] is not opener:
        raise ValueError(f"the upstream type {type_name!r} is registered twice")
    _TYPES[type_name] = opener


def opener_for(type_name: str) -> Opener | None:
    return _TYPES.get(type_name)


def known_types() -> list[str]:
    return sorted(_TYPES)
