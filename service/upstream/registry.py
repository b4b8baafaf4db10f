"""The upstream instances of a deployment, and the routing of each task's attempts among them.

A model maps to the instances that serve it, grouped by priority (lower first). An attempt goes to one instance of
the best priority whose breaker lets work through and which has room under its concurrency cap, chosen at random in
proportion to the weights; when all of them are busy it goes to the next priority, and when every available instance
is busy it waits for room.

Failover: a transient failure before the instance accepted the job moves the task's next attempt to another instance
(one it has not tried, while there is one). Once an instance accepted the job (the task API answered with our task
id), every later attempt goes to that instance and resumes the job by its id, whatever its breaker says, so no job is
paid for twice; the worker records the acceptance on the task so that a retry after a crash keeps to it as well.

The breakers live in the process that makes the attempts: `imagegen serve` (which runs the workers by default) sees
its own; an API process started with RUN_WORKERS=false makes no attempts, so its breakers stay closed and
`/api/admin/upstreams` there shows the configuration, with each worker process keeping breakers of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Histogram

from service.metrics import INSTANCE_ATTEMPTS, INSTANCE_BREAKER, INSTANCE_IN_FLIGHT, INSTANCE_SECONDS
from service.settings import Settings, SettingsError
from service.upstream import images_api, offline_instance, tasks_api
from service.upstream.adapters import Opening, known_types, opener_for
from service.upstream.base import GenerationRequest, GenerationResult, ImageUpstream, UpstreamError
from service.upstream.http import UpstreamHealth
from service.upstream_config import InstanceConfig

BUILT_IN = (tasks_api, images_api, offline_instance)
LATENCY_WINDOW = 200
BREAKER_LEVEL = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(eq=False, slots=True)
class Instance:
    config: InstanceConfig
    adapter: ImageUpstream
    health: UpstreamHealth
    in_flight: int = 0
    # Durations of the latest successful attempts, for the percentiles operators see.
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    # This instance's series of the per-instance metrics, looked up once.
    succeeded: Counter = field(init=False)
    seconds: Histogram = field(init=False)

    def __post_init__(self) -> None:
        self.succeeded = INSTANCE_ATTEMPTS.labels(self.config.name, "ok")
        self.seconds = INSTANCE_SECONDS.labels(self.config.name)

    @property
    def name(self) -> str:
        return self.config.name

    def has_room(self) -> bool:
        return self.in_flight < self.config.max_concurrency


@dataclass(slots=True)
class Route:
    """One task's way through the instances across its attempts: the instance holding its job (`pinned`), those
    that failed it before accepting it (`tried`), the one its latest attempt went to (`last`), the latest error an
    instance gave it (`error`), and every ended attempt, oldest first, earlier runs' included (`attempts`: the
    instance and the error code it ended with, None for the one that produced the result)."""

    pinned: str | None = None
    tried: set[str] = field(default_factory=set)
    last: str | None = None
    error: UpstreamError | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)


Accepted = Callable[[str], Awaitable[None]]


class Upstreams:
    def __init__(self, instances: list[Instance]) -> None:
        self._instances = {instance.name: instance for instance in instances}
        by_model: dict[str, dict[int, list[Instance]]] = {}
        for instance in instances:
            for model in instance.config.models:
                by_model.setdefault(model, {}).setdefault(instance.config.priority, []).append(instance)
        self._groups = {model: [groups[p] for p in sorted(groups)] for model, groups in by_model.items()}
        self._room = asyncio.Event()
        for instance in instances:
            INSTANCE_IN_FLIGHT.labels(instance.name).set_function(lambda i=instance: i.in_flight)  # type: ignore[misc]
            INSTANCE_BREAKER.labels(instance.name).set_function(
                lambda i=instance: BREAKER_LEVEL[i.health.state]  # type: ignore[misc]
            )

    @property
    def instances(self) -> list[Instance]:
        return list(self._instances.values())

    def instance(self, name: str) -> Instance | None:
        return self._instances.get(name)

    def instances_for(self, model: str) -> list[str]:
        """The names of the instances serving `model`, best priority first."""
        return [instance.name for group in self._groups.get(model, ()) for instance in group]

    def models(self) -> list[str]:
        return list(self._groups)

    def available(self, model: str) -> bool:
        """Whether some instance serving `model` takes work now (its breaker is closed or lets a probe through)."""
        return any(instance.health.available() for group in self._groups.get(model, ()) for instance in group)

    def retry_in(self, model: str, tenant: str | None = None) -> float:
        """Seconds until some instance serving `model` takes work (of `tenant`, when given) again; 0 when one does
        now."""
        waits = [instance.health.open_for(tenant) for group in self._groups.get(model, ()) for instance in group]
        return min(waits, default=0.0)

    def unavailable_models(self) -> frozenset[str]:
        """The models no instance takes work for now: the worker pool leaves their tasks queued."""
        return frozenset(model for model in self._groups if not self.available(model))

    def cooldown_left(self) -> float:
        """While no model has an instance taking work, the seconds until one may again; 0 while some model has."""
        if any(self.available(model) for model in self._groups):
            return 0.0
        return min((instance.health.open_for() for instance in self._instances.values()), default=0.0)

    def choose(self, model: str, avoid: Collection[str] = (), tenant: str | None = None) -> Instance | None:
        """The instance for a new attempt at `model` (for `tenant`'s work, when given), not one in `avoid` while
        another is available; None when no instance serving it is available, and the model's first available
        instance when all are busy."""
        groups = self._groups.get(model, ())
        for skipped in (avoid, ()) if avoid else ((),):
            waiting: Instance | None = None
            for group in groups:
                ready = [i for i in group if i.name not in skipped and i.health.available(tenant)]
                free = [i for i in ready if i.has_room()]
                if free:
                    if len(free) == 1:
                        return free[0]
                    return random.choices(free, weights=[i.config.weight for i in free])[0]
                waiting = waiting or (ready[0] if ready else None)
            if waiting is not None:
                return waiting
        return None

    async def generate(self, request: GenerationRequest, route: Route, accepted: Accepted) -> GenerationResult:
        """One attempt of a task: on the instance holding its job, else on the one routing chooses (waiting for room
        under the concurrency caps). `accepted(name)` runs when an instance accepts the job."""
        instance = await self._instance_for(request.model, route, request.tenant_id)
        route.last = instance.name

        async def on_accepted() -> None:
            if route.pinned != instance.name:
                route.pinned = instance.name
                await accepted(instance.name)

        # An attempt under a tenant's own key says nothing of the instance with ours: the breaker leaves it out.
        counted = request.api_key is None
        health = instance.health
        if counted:
            health.begin()
        instance.in_flight += 1
        started = time.perf_counter()
        try:
            result = await instance.adapter.generate(dataclasses.replace(request, on_accepted=on_accepted))
        except UpstreamError as exc:
            route.error = exc
            route.attempts.append({"instance": instance.name, "error": exc.code})
            if counted:
                health.record(exc, request.tenant_id)
            INSTANCE_ATTEMPTS.labels(instance.name, exc.code).inc()
            if route.pinned is None:
                route.tried.add(instance.name)
                if exc.blocking and self.choose(request.model, route.tried, request.tenant_id) not in (None, instance):
                    # This instance cannot serve anyone; another may.
                    raise UpstreamError(exc.code, exc.message, transient=True) from None
            raise
        finally:
            instance.in_flight -= 1
            self._room.set()
        elapsed = time.perf_counter() - started
        route.attempts.append({"instance": instance.name, "error": None})
        if counted:
            health.succeeded(request.tenant_id)
        instance.latencies.append(elapsed)
        instance.succeeded.inc()
        instance.seconds.observe(elapsed)
        return result

    async def _instance_for(self, model: str, route: Route, tenant: str | None) -> Instance:
        if route.pinned is not None:
            pinned = self._instances.get(route.pinned)
            if pinned is None:
                raise UpstreamError(
                    "upstream_instance_gone",
                    "The upstream instance that accepted this task is no longer configured",
                    transient=False,
                )
            return pinned
        if model not in self._groups:
            raise UpstreamError(
                "upstream_model_unserved", "No upstream instance serves this model any more", transient=False
            )
        while True:
            instance = self.choose(model, route.tried, tenant)
            if instance is None:
                # The task's own latest failure says best why it could not run, when it met one.
                code, message = (
                    (route.error.code, route.error.message)
                    if route.error is not None
                    else ("no_upstream_available", "No upstream instance serving this model is available")
                )
                raise UpstreamError(code, message, transient=True, retry_after=self.retry_in(model, tenant))
            if instance.has_room():
                return instance
            self._room.clear()
            await self._room.wait()


def import_adapter_modules(settings: Settings) -> None:
    """Import the modules the upstreams file names, so their types register, and check every instance's type."""
    for module in settings.adapter_modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise SettingsError(f"UPSTREAMS_FILE: adapter module {module!r} cannot be imported ({exc})") from None
    for config in settings.upstreams:
        if opener_for(config.type) is None:
            raise SettingsError(
                f"UPSTREAMS_FILE: instance {config.name!r}: unknown type {config.type!r} "
                f"(known: {', '.join(known_types())})"
            )


@contextlib.asynccontextmanager
async def open_upstreams(settings: Settings) -> AsyncIterator[Upstreams]:
    """Open every configured instance, each with a breaker of its own; closed again on leaving."""
    import_adapter_modules(settings)
    async with contextlib.AsyncExitStack() as stack:
        instances = []
        for config in settings.upstreams:
            opener = opener_for(config.type)
            assert opener is not None
            adapter = await opener(Opening(config, settings.upstream_keys.get(config.name), settings, stack))
            stack.push_async_callback(adapter.close)
            health = UpstreamHealth(
                failures_to_open=config.failures_to_open or settings.upstream_breaker_failures,
                cooldown_seconds=(
                    settings.upstream_breaker_cooldown_seconds
                    if config.cooldown_seconds is None
                    else config.cooldown_seconds
                ),
                block_seconds=settings.upstream_cooldown_seconds,
                name=config.name,
            )
            instances.append(Instance(config=config, adapter=adapter, health=health))
        yield Upstreams(instances)
