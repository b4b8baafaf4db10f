"""The upstream instances a deployment talks to: `UPSTREAMS_FILE` (YAML) read into typed instances, or, without the
file, one implicit instance named `default` built from the `CHATGPT2API_*` variables exactly as before.

An instance never holds a secret in the file: it names the environment variable that does (`api_key_env`), and a
variable that is not set stops start-up with one line naming it. The keys themselves are read here, once, and kept
apart from the instances (`Settings.upstream_keys`), so an instance can be shown or logged whole.

This module imports nothing of the service: the settings read it, and the adapters and the registry read its types.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

TASKS_TYPE = "chatgpt2api-tasks"
IMAGES_TYPE = "openai-images"
OFFLINE_TYPE = "offline"
# The protocol each built-in type speaks; any other type (the offline one included) says it with `api`.
FIXED_PROTOCOLS = {TASKS_TYPE: "tasks", IMAGES_TYPE: "images"}
NEEDS_ENDPOINT = (TASKS_TYPE, IMAGES_TYPE)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INLINE_SECRETS = ("api_key", "key", "token", "secret", "password")


class ConfigError(ValueError):
    """The upstreams file, or the variables it names, cannot be used; the message is one line naming what is wrong."""


class InstanceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One upstream instance. `priority`: lower is tried first; among the healthy instances of the best priority
    serving a model, one is picked at random in proportion to `weight`. `max_concurrency`: tasks this process runs on
    the instance at once. `api` (`tasks` or `images`): the protocol of an `offline` instance or of an added type; the
    two real types speak their own."""

    name: str
    type: str
    models: list[str]
    base_url: str | None = None
    api_key_env: str | None = None
    api: Literal["tasks", "images"] | None = None
    priority: int = 1
    weight: float = 1.0
    max_concurrency: int = 16
    timeout_seconds: float | None = None
    poll_interval_seconds: float | None = None
    cooldown_seconds: float | None = None
    failures_to_open: int | None = None

    @property
    def protocol(self) -> str:
        return FIXED_PROTOCOLS.get(self.type) or self.api or "tasks"


class UpstreamsFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`adapter_modules`: Python modules imported at start-up that register adapter types of their own."""

    instances: list[InstanceConfig]
    adapter_modules: list[str] = []


SAMPLE = """\
# UPSTREAMS_FILE: the upstream instances this deployment sends image work to.
#
# Each instance has a unique name (shown on tasks, in /api/admin/upstreams and in metrics), a type, and the models
# it serves. Secrets never go in this file: `api_key_env` names the environment variable holding the key, and a
# variable that is not set stops start-up.
#
# Routing: for a task's model, the instances with the lowest `priority` number are used first; among the healthy
# ones, one is chosen at random in proportion to `weight`. An instance whose circuit breaker is open gets no new work:
# after `failures_to_open` transient failures in a row (default UPSTREAM_BREAKER_FAILURES) for `cooldown_seconds`
# (default UPSTREAM_BREAKER_COOLDOWN_SECONDS), and at once for UPSTREAM_COOLDOWN_SECONDS when it says it has no quota
# or refuses our key; then one task probes it, and its success closes the breaker.
#
# Types: chatgpt2api-tasks (chatgpt2api's task API), openai-images (the OpenAI Images API), offline (the built-in
# offline upstream, started inside the process; `api: tasks` or `api: images` picks its protocol).
# All instances serving one model must speak the same protocol (sizes are normalized per model).
instances:
  - name: pool
    type: chatgpt2api-tasks
    base_url: https://chatgpt2api.internal.example
    api_key_env: CHATGPT2API_API_KEY
    models: [gpt-image-2]
    priority: 1
    weight: 3
    max_concurrency: 32
    timeout_seconds: 120
    poll_interval_seconds: 1
  - name: pool-backup
    type: chatgpt2api-tasks
    base_url: https://chatgpt2api-backup.internal.example
    api_key_env: CHATGPT2API_BACKUP_API_KEY
    models: [gpt-image-2]
    priority: 2
  - name: openai
    type: openai-images
    base_url: https://api.openai.com/v1
    api_key_env: OPENAI_API_KEY
    models: [gpt-image-1]
    max_concurrency: 8
    cooldown_seconds: 60
    failures_to_open: 5
  - name: local
    type: offline
    api: tasks
    models: [offline-sketch]
# Optional: modules that register adapter types of their own (see service/upstream/adapters.py).
# adapter_modules: [mycompany.upstreams]
"""


def implicit_instance(base_url: str | None, api: str, models: tuple[str, ...]) -> InstanceConfig:
    """Today's single upstream as an instance named `default`: the configured one, or the built-in offline one."""
    if base_url is None:
        return InstanceConfig(
            name="default", type=OFFLINE_TYPE, api="images" if api == "images" else "tasks", models=list(models)
        )
    kind = IMAGES_TYPE if api == "images" else TASKS_TYPE
    return InstanceConfig(
        name="default", type=kind, base_url=base_url, api_key_env="CHATGPT2API_API_KEY", models=list(models)
    )


def parse_upstreams(text: str, env: Mapping[str, str]) -> tuple[UpstreamsFile, dict[str, str]]:
    """The file's instances and each one's key by instance name; ConfigError naming what is wrong otherwise."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"not valid YAML{where}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("instances"), list) or not raw["instances"]:
        raise ConfigError("expected a mapping with a non-empty list `instances`")
    for index, item in enumerate(raw["instances"]):
        _refuse_inline_secrets(index, item)
    try:
        parsed = msgspec.convert(raw, UpstreamsFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc)) from None
    keys: dict[str, str] = {}
    seen: set[str] = set()
    for instance in parsed.instances:
        _check_instance(instance, seen)
        if instance.api_key_env is not None:
            value = (env.get(instance.api_key_env) or "").strip()
            if not value:
                raise ConfigError(
                    f"instance {instance.name!r}: the environment variable {instance.api_key_env} is not set"
                )
            keys[instance.name] = value
    check_protocols(parsed.instances)
    return parsed, keys


def read_upstreams(path: Path, env: Mapping[str, str]) -> tuple[UpstreamsFile, dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror or type(exc).__name__})") from None
    return parse_upstreams(text, env)


def check_protocols(instances: list[InstanceConfig]) -> dict[str, str]:
    """Each model's protocol; a model whose instances speak different protocols is refused, since a task's size is
    normalized once, at submission, for the protocol of its model."""
    protocols: dict[str, str] = {}
    owners: dict[str, str] = {}
    for instance in instances:
        for model in instance.models:
            known = protocols.setdefault(model, instance.protocol)
            owner = owners.setdefault(model, instance.name)
            if known != instance.protocol:
                raise ConfigError(
                    f"model {model!r} is served by {owner!r} ({known}) and {instance.name!r} ({instance.protocol}); "
                    "the instances of one model must speak one protocol"
                )
    return protocols


def _refuse_inline_secrets(index: int, item: Any) -> None:
    if not isinstance(item, dict):
        return
    for field in _INLINE_SECRETS:
        if field in item:
            name = item.get("name") if isinstance(item.get("name"), str) else f"#{index + 1}"
            raise ConfigError(
                f"instance {name!r}: `{field}` is not accepted in the file; name the environment variable that holds "
                "the key with `api_key_env`"
            )


def _check_instance(instance: InstanceConfig, seen: set[str]) -> None:
    name = instance.name
    if not _NAME.match(name):
        raise ConfigError(
            f"instance {name!r}: a name is 1 to 32 of a-z, 0-9, '-' and '_', starting with a letter or digit"
        )
    if name in seen:
        raise ConfigError(f"instance {name!r} is named twice")
    seen.add(name)
    label = f"instance {name!r}"
    if not instance.models or any(not model.strip() for model in instance.models):
        raise ConfigError(f"{label}: list the models it serves in `models`")
    if instance.type in NEEDS_ENDPOINT:
        if instance.base_url is None or not re.match(r"^https?://[^/\s]+", instance.base_url):
            raise ConfigError(f"{label}: `base_url` must be an http(s) URL")
        if instance.api_key_env is None:
            raise ConfigError(f"{label}: `api_key_env` must name the variable holding its key")
        if instance.api is not None and instance.api != FIXED_PROTOCOLS[instance.type]:
            raise ConfigError(f"{label}: a {instance.type} instance speaks {FIXED_PROTOCOLS[instance.type]}")
    if instance.api_key_env is not None and not _ENV_NAME.match(instance.api_key_env):
        raise ConfigError(f"{label}: `api_key_env` must be an environment variable's name")
    if not instance.weight > 0:
        raise ConfigError(f"{label}: `weight` must be above 0")
    if instance.max_concurrency < 1:
        raise ConfigError(f"{label}: `max_concurrency` must be at least 1")
    for field in ("timeout_seconds", "poll_interval_seconds"):
        value = getattr(instance, field)
        if value is not None and not value > 0:
            raise ConfigError(f"{label}: `{field}` must be above 0")
    if instance.cooldown_seconds is not None and instance.cooldown_seconds < 0:
        raise ConfigError(f"{label}: `cooldown_seconds` must not be negative")
    if instance.failures_to_open is not None and instance.failures_to_open < 1:
        raise ConfigError(f"{label}: `failures_to_open` must be at least 1")
