"""The names of the upstream instances, and which of them serve a model: what tenants' provider keys are stored for
and matched against. They come from the deployment's instances (`UPSTREAMS_FILE`, or the one implicit `default`)."""

from __future__ import annotations

from service.settings import Settings


def instance_names(settings: Settings) -> list[str]:
    """Every instance a tenant may store a provider key for."""
    return [instance.name for instance in settings.upstreams]


def instances_serving(settings: Settings, model: str) -> list[str]:
    """The instances that serve `model`, in the order routing prefers them (by priority)."""
    serving = [instance for instance in settings.upstreams if model in instance.models]
    return [instance.name for instance in sorted(serving, key=lambda instance: instance.priority)]
