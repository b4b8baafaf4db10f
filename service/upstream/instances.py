"""The names of the upstream instances, and which of them serve a model: what tenants' provider keys are stored for
and matched against. This deployment has one upstream, the instance `default`, serving every model."""

from __future__ import annotations

from service.settings import Settings

DEFAULT_INSTANCE = "default"


def instance_names(settings: Settings) -> list[str]:
    """Every instance a tenant may store a provider key for."""
    return [DEFAULT_INSTANCE]


def instances_serving(settings: Settings, model: str) -> list[str]:
    """The instances that serve `model`, in the order the worker prefers them."""
    return [DEFAULT_INSTANCE] if model in settings.image_models else []
