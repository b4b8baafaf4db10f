"""The upstreams file, the routing among instances and the breaker's states, in process: the file's parser on the
documented sample and on what it refuses, `Upstreams.choose` over instances with the test-only adapter, and the breaker
driven by a clock the test moves."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings, SettingsError
from service.upstream.http import UpstreamHealth
from service.upstream.registry import Instance, Upstreams
from service.upstream_config import SAMPLE, ConfigError, InstanceConfig, parse_upstreams
from testing.local_adapter import LocalUpstream

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_ENV = {"CHATGPT2API_API_KEY": "k1", "CHATGPT2API_BACKUP_API_KEY": "k2", "OPENAI_API_KEY": "k3"}


def test_the_sample_the_cli_prints_parses_and_is_the_one_in_the_readme() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "service", "upstreams", "sample"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert printed == SAMPLE
    assert SAMPLE in (ROOT / "README.md").read_text()
    parsed, keys = parse_upstreams(printed, SAMPLE_ENV)
    assert [instance.name for instance in parsed.instances] == ["pool", "pool-backup", "openai", "local"]
    assert keys == {"pool": "k1", "pool-backup": "k2", "openai": "k3"}
    assert [instance.protocol for instance in parsed.instances] == ["tasks", "tasks", "images", "tasks"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("instances: []", "non-empty list `instances`"),
        ("instances: [{name: a, type: offline, models: [m]}, {name: a, type: offline, models: [m]}]", "named twice"),
        ("instances: [{name: A!, type: offline, models: [m]}]", "a name is 1 to 32"),
        ("instances: [{name: a, type: offline, models: []}]", "list the models"),
        ("instances: [{name: a, type: openai-images, api_key_env: K, models: [m]}]", "`base_url`"),
        ("instances: [{name: a, type: openai-images, base_url: 'https://x', models: [m]}]", "`api_key_env`"),
        ("instances: [{name: a, type: offline, models: [m], weight: 0}]", "`weight`"),
        ("instances: [{name: a, type: offline, models: [m], token: abc}]", "not accepted in the file"),
        ("instances: [{name: a, type: offline, models: [m], colour: red}]", "unknown field `colour`"),
        ("instances: [{name: a, type: offline, models: [m], priority: high}]", "Expected `int`"),
        (
            "instances: [{name: a, type: offline, api: tasks, models: [m]}, "
            "{name: b, type: offline, api: images, models: [m]}]",
            "must speak one protocol",
        ),
        (
            "instances: [{name: a, type: openai-images, base_url: 'https://x', api_key_env: UNSET_KEY, models: [m]}]",
            "UNSET_KEY is not set",
        ),
        ("instances: [", "not valid YAML"),
    ],
)
def test_a_file_that_cannot_be_used_is_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_upstreams(text, {})


def test_an_inline_key_is_refused_without_showing_it() -> None:
    text = "instances: [{name: a, type: openai-images, base_url: 'https://x', api_key: sk-secret-value, models: [m]}]"
    with pytest.raises(ConfigError) as refused:
        parse_upstreams(text, {})
    assert "sk-secret-value" not in str(refused.value) and "api_key_env" in str(refused.value)


def test_without_a_file_the_variables_make_one_default_instance() -> None:
    offline = Settings.from_mapping({})
    assert [(i.name, i.type, i.protocol, i.models) for i in offline.upstreams] == [
        ("default", "offline", "tasks", ["gpt-image-2"])
    ]
    assert offline.is_offline and offline.upstream_keys == {}
    real = Settings.from_mapping(
        {
            "CHATGPT2API_BASE_URL": "https://up.example/v1",
            "CHATGPT2API_API_KEY": "the-key",
            "UPSTREAM_API": "images",
            "IMAGE_MODELS": "gpt-image-1",
        }
    )
    (instance,) = real.upstreams
    assert (instance.name, instance.type, instance.base_url) == ("default", "openai-images", "https://up.example/v1")
    assert instance.models == ["gpt-image-2", "gpt-image-1"]
    assert real.upstream_keys == {"default": "the-key"} and "the-key" not in repr(real)
    assert real.protocol_for("gpt-image-1") == "images"


def test_a_file_replaces_the_models_and_keeps_its_keys_out_of_the_settings_repr(tmp_path: Path) -> None:
    path = tmp_path / "upstreams.yaml"
    path.write_text(SAMPLE)
    settings = Settings.from_mapping({"UPSTREAMS_FILE": str(path), **SAMPLE_ENV})
    assert settings.image_models == ("gpt-image-2", "gpt-image-1", "offline-sketch")
    assert settings.image_model == "gpt-image-2"
    assert settings.protocol_for("gpt-image-1") == "images"
    assert not any(key in repr(settings) for key in SAMPLE_ENV.values())
    with pytest.raises(SettingsError, match=r"^UPSTREAMS_FILE: instance 'pool-backup': the environment variable"):
        Settings.from_mapping({"UPSTREAMS_FILE": str(path), "CHATGPT2API_API_KEY": "k1"})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_breaker_opens_after_its_failures_then_one_probe_closes_it() -> None:
    clock = Clock()
    health = UpstreamHealth(failures_to_open=2, cooldown_seconds=5, block_seconds=30, clock=clock)
    health.failed("upstream_timeout")
    assert health.state == "closed" and health.available()
    health.failed("upstream_timeout")
    assert health.state == "open" and not health.available() and health.open_for() == 5
    clock.now += 5
    assert health.state == "half_open" and health.available()
    health.begin()
    assert not health.available(), "a second attempt while the probe runs"
    health.failed("upstream_unavailable")
    assert health.state == "open" and health.last_error == "upstream_unavailable"
    clock.now += 5
    health.begin()
    health.succeeded()
    assert health.state == "closed" and health.available() and health.last_error is None
    assert health.consecutive_failures == 0


def test_failures_of_one_tenant_alone_hold_back_only_that_tenant() -> None:
    clock = Clock()
    health = UpstreamHealth(failures_to_open=2, cooldown_seconds=5, clock=clock)
    health.succeeded("bystander")
    clock.now += 30
    health.failed("upstream_unavailable", "poisoner")
    health.failed("upstream_unavailable", "poisoner")
    assert health.state == "closed" and health.available() and health.available("bystander")
    assert not health.available("poisoner") and health.open_for("poisoner") == 5 and health.held_tenants == 1
    clock.now += 5
    assert health.available("poisoner") and health.held_tenants == 0
    # Its next failure holds it again at once; a success of someone else does not free it; its own success does.
    health.failed("upstream_unavailable", "poisoner")
    assert not health.available("poisoner")
    health.succeeded("bystander")
    assert not health.available("poisoner") and health.consecutive_failures == 0
    health.succeeded("poisoner")
    assert health.available("poisoner") and health.held_tenants == 0


def test_failures_of_the_only_tenant_working_lately_open_the_breaker_for_everyone() -> None:
    """Nobody else's call succeeded in the last minute (a single tenant, say): the instance may be what fails."""
    clock = Clock()
    health = UpstreamHealth(failures_to_open=2, cooldown_seconds=5, clock=clock)
    health.succeeded("alone")
    health.succeeded("someone")
    clock.now += 61
    health.failed("upstream_unavailable", "alone")
    health.failed("upstream_unavailable", "alone")
    assert health.state == "open" and not health.available("someone") and health.held_tenants == 0


def test_failures_of_two_tenants_or_of_no_tenant_open_the_breaker_for_everyone() -> None:
    clock = Clock()
    health = UpstreamHealth(failures_to_open=2, cooldown_seconds=5, clock=clock)
    health.failed("upstream_timeout", "first")
    health.failed("upstream_timeout", "second")
    assert health.state == "open" and not health.available() and not health.available("third")
    clock.now += 5
    health.begin()
    health.succeeded("third")
    # One tenant's run is held back (the third one's call succeeded); then another tenant's failure joins the run:
    # the instance itself is sick.
    health.failed("upstream_timeout", "first")
    health.failed("upstream_timeout", "first")
    assert health.state == "closed" and not health.available("first")
    health.failed("upstream_timeout", "second")
    assert health.state == "open" and not health.available("third")
    clock.now += 5
    health.begin()
    health.succeeded()
    health.failed("upstream_timeout")
    health.failed("upstream_timeout")
    assert health.state == "open"


def test_a_blocking_error_opens_the_breaker_at_once_for_the_longer_cool_down() -> None:
    clock = Clock()
    health = UpstreamHealth(failures_to_open=3, cooldown_seconds=5, block_seconds=30, clock=clock)
    health.block("upstream_quota_exhausted")
    assert health.state == "open" and health.open_for() == 30
    clock.now += 29
    assert not health.available()
    clock.now += 1
    assert health.available() and health.open_for() == 0


def _instance(name: str, models: list[str], clock: Clock, **extra: int | float) -> Instance:
    config = InstanceConfig(name=name, type="testing-local", models=models, **extra)  # type: ignore[arg-type]
    health = UpstreamHealth(failures_to_open=1, cooldown_seconds=5, clock=clock)
    return Instance(config=config, adapter=LocalUpstream(name), health=health)


def test_routing_takes_the_best_priority_then_the_next_when_it_is_down_busy_or_tried() -> None:
    clock = Clock()
    first = _instance("first", ["m"], clock, priority=1, max_concurrency=1)
    second = _instance("second", ["m", "other"], clock, priority=2)
    upstreams = Upstreams([second, first])
    assert upstreams.instances_for("m") == ["first", "second"]
    assert upstreams.instances_for("other") == ["second"] and upstreams.instances_for("none") == []
    assert {upstreams.choose("m").name for _ in range(20)} == {"first"}  # type: ignore[union-attr]
    assert upstreams.choose("m", avoid={"first"}) is second
    first.in_flight = 1
    assert upstreams.choose("m") is second
    first.in_flight = 0
    first.health.failed("upstream_timeout")
    assert upstreams.choose("m") is second and upstreams.available("m")
    second.health.failed("upstream_timeout")
    assert upstreams.choose("m") is None and not upstreams.available("m")
    assert upstreams.retry_in("m") == 5
    clock.now += 5
    assert upstreams.choose("m") is first


def test_routing_weighs_the_healthy_instances_of_one_priority() -> None:
    clock = Clock()
    heavy = _instance("heavy", ["m"], clock, weight=3)
    light = _instance("light", ["m"], clock, weight=1)
    upstreams = Upstreams([heavy, light])
    random.seed(14)
    picks = [upstreams.choose("m") for _ in range(4000)]
    share = picks.count(heavy) / len(picks)
    assert 0.70 < share < 0.80
    light.health.failed("upstream_timeout")
    assert {upstreams.choose("m") for _ in range(50)} == {heavy}
