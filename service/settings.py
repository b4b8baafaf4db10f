"""The one settings object: every variable the service reads, with its default and validation.

Values come from the environment, and from a `.env` file in the working directory when present (the environment wins).
A bad value raises `SettingsError` naming the variable; the CLI prints it as one line and exits.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from service.upstream_config import ConfigError, InstanceConfig, check_protocols, implicit_instance, read_upstreams

T = TypeVar("T")

QUALITIES = ("auto", "low", "medium", "high")
# The longest retention of result images a deployment or a tenant may set: a century, in days.
MAX_RETENTION_DAYS = 36_500.0


class SettingsError(ValueError):
    """A configuration variable is missing or invalid."""


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = Path("data")
    database_url: str = ""
    storage_url: str = ""
    admin_api_key: str | None = None
    end_user_token_secret: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    auto_migrate: bool = True

    upstream_base_url: str | None = None
    upstream_api_key: str | None = field(default=None, repr=False)
    upstream_api: str = "tasks"
    image_model: str = "gpt-image-2"
    prompt_model: str = "gpt-5.5"
    image_models: tuple[str, ...] = ("gpt-image-2",)
    prices: Mapping[str, int] = field(default_factory=lambda: {"auto": 1, "low": 1, "medium": 1, "high": 2})
    offline_latency: float = 1.0
    offline_token_delay: float = 0.03

    prompt_base_url: str | None = None
    prompt_api_key: str | None = field(default=None, repr=False)
    prompt_endpoint_model: str | None = None
    enhance_cost: int = 0
    enhance_rate_per_minute: int = 60
    prompt_cache_entries: int = 10_000
    prompt_cache_ttl: float = 86_400.0
    idempotency_ttl: float = 86_400.0
    rate_limit_per_minute: int = 600
    max_running_tasks: int = 8

    upstream_timeout: float = 120.0
    poll_interval: float = 1.0
    task_deadline: float = 900.0
    max_attempts: int = 3
    retry_base_delay: float = 0.5
    retry_max_delay: float = 15.0
    worker_concurrency: int = 16
    lease_seconds: float = 30.0
    idle_poll_seconds: float = 1.0
    run_workers: bool = True

    max_reference_upload_mb: float = 10.0
    max_reference_images: int = 4
    max_reference_pixels: int = 2_000_000
    max_images_per_task: int = 4
    max_prompt_chars: int = 4000
    max_output_image_mb: float = 32.0
    max_reference_pixels_in: int = 40_000_000
    decode_concurrency: int = 2
    # The output quality gate (service/images/quality.py): 0 turns a check off.
    quality_min_stddev: float = 2.0
    quality_aspect_tolerance: float = 0.05

    prompt_models: tuple[str, ...] = ()
    prompt_max_output_tokens: int = 600

    metrics_token: str | None = field(default=None, repr=False)
    end_user_rate_limit_per_minute: int = 60
    end_user_max_running_tasks: int = 2

    header_timeout: float = 10.0
    keep_alive_timeout: float = 75.0
    max_connections: int = 2048
    stream_idle_seconds: float = 60.0

    upstream_cooldown_seconds: float = 30.0
    upstream_breaker_failures: int = 3
    upstream_breaker_cooldown_seconds: float = 5.0
    # The upstream instances: from UPSTREAMS_FILE, or the one implicit `default` instance; keys by instance name.
    upstreams_file: Path | None = None
    upstreams: tuple[InstanceConfig, ...] = field(
        default_factory=lambda: (implicit_instance(None, "tasks", ("gpt-image-2",)),)
    )
    upstream_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    adapter_modules: tuple[str, ...] = ()
    model_protocols: Mapping[str, str] = field(default_factory=lambda: {"gpt-image-2": "tasks"})

    gc_interval_seconds: float = 3600.0
    reference_retention_hours: float = 168.0
    # How long a task's result images (and its references) are kept after it finished; 0 keeps them forever. A tenant
    # may have its own (`tenants.result_retention_days`).
    result_retention_days: float = 30.0

    max_canvas_pixels: int = 16_000_000
    max_canvas_steps: int = 200

    # The keys that encrypt tenants' provider keys at rest, newest first (see service/providerkeys/keyring.py).
    encryption_keys: tuple[bytes, ...] = field(default=(), repr=False)

    # The OpenAI-compatible routes (/v1): how long a request waits for its task, how long a `url` answer's signed link
    # lasts, and the address those links start with (else the one the request came to).
    openai_wait_seconds: float = 120.0
    openai_url_ttl_seconds: float = 900.0
    public_base_url: str | None = None

    # Webhooks (service/webhooks/): whether deliveries may go to loopback, private, link-local or otherwise
    # non-public addresses; how long one attempt may take; the delays between attempts, in seconds, after which a
    # delivery that never succeeded is `failed`.
    webhooks_allow_private: bool = False
    webhooks_timeout_seconds: float = 10.0
    webhooks_retry_schedule: tuple[float, ...] = (5.0, 30.0, 120.0, 600.0, 3600.0, 21600.0, 86400.0)

    @property
    def is_offline(self) -> bool:
        """Every image instance is the built-in offline upstream (the case with no upstream configured at all)."""
        return all(instance.type == "offline" for instance in self.upstreams)

    def protocol_for(self, model: str) -> str:
        """The protocol (`tasks` or `images`) of the instances serving `model`, for which its sizes are normalized."""
        return self.model_protocols.get(model, self.upstream_api)

    @property
    def prompt_model_name(self) -> str | None:
        """The model enhancements use: `PROMPT_MODEL` on a separate endpoint, else `CHATGPT2API_PROMPT_MODEL`."""
        return self.prompt_endpoint_model if self.prompt_base_url else self.prompt_model

    @property
    def max_reference_bytes(self) -> int:
        return int(self.max_reference_upload_mb * 1024 * 1024)

    @property
    def max_output_bytes(self) -> int:
        return int(self.max_output_image_mb * 1024 * 1024)

    @property
    def max_request_body_bytes(self) -> int:
        """Room for every reference, a mask and the form fields; anything larger is refused before it is read."""
        return self.max_reference_bytes * (self.max_reference_images + 1) + 1024 * 1024

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        values = dict(read_dotenv(Path(".env")))
        values.update(os.environ if env is None else env)
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, env: Mapping[str, str]) -> Settings:
        read = _Reader(env)
        data_dir = Path(read.text("DATA_DIR", "data"))
        base_url = read.optional_url("CHATGPT2API_BASE_URL")
        image_model = read.text("CHATGPT2API_IMAGE_MODEL", "gpt-image-2")
        extra_models = read.csv("IMAGE_MODELS")
        models = tuple(dict.fromkeys([image_model, *extra_models]))
        upstream_api = read.choice("UPSTREAM_API", "tasks", ("tasks", "images"))
        upstreams_file = read.optional_text("UPSTREAMS_FILE")
        adapter_modules: tuple[str, ...] = ()
        keys: dict[str, str] = {}
        if upstreams_file is None:
            instances: tuple[InstanceConfig, ...] = (implicit_instance(base_url, upstream_api, models),)
            if base_url is not None and read.optional_text("CHATGPT2API_API_KEY"):
                keys["default"] = read.text("CHATGPT2API_API_KEY", "")
        else:
            try:
                parsed, keys = read_upstreams(Path(upstreams_file), env)
            except ConfigError as exc:
                raise SettingsError(f"UPSTREAMS_FILE: {exc}") from None
            instances = tuple(parsed.instances)
            adapter_modules = tuple(parsed.adapter_modules)
            served = tuple(dict.fromkeys(model for instance in instances for model in instance.models))
            image_model = image_model if image_model in served else served[0]
            models = served
        settings = cls(
            data_dir=data_dir,
            database_url=read.text("DATABASE_URL", f"sqlite+aiosqlite:///{data_dir / 'imagegen.db'}"),
            storage_url=read.text("STORAGE_URL", str(data_dir / "images")),
            admin_api_key=read.optional_text("ADMIN_API_KEY"),
            end_user_token_secret=read.optional_text("END_USER_TOKEN_SECRET"),
            log_level=read.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"), upper=True),
            auto_migrate=read.boolean("AUTO_MIGRATE", True),
            upstream_base_url=base_url,
            upstream_api_key=read.optional_text("CHATGPT2API_API_KEY"),
            upstream_api=upstream_api,
            image_model=image_model,
            prompt_model=read.text("CHATGPT2API_PROMPT_MODEL", "gpt-5.5"),
            image_models=models,
            prices=read.prices("IMAGE_PRICES", "auto=1,low=1,medium=1,high=2"),
            offline_latency=read.number("OFFLINE_LATENCY_SECONDS", 1.0, minimum=0.0),
            offline_token_delay=read.number("OFFLINE_TOKEN_DELAY_SECONDS", 0.03, minimum=0.0),
            prompt_base_url=read.optional_url("PROMPT_BASE_URL"),
            prompt_api_key=read.optional_text("PROMPT_API_KEY"),
            prompt_endpoint_model=read.optional_text("PROMPT_MODEL"),
            enhance_cost=read.integer("PROMPT_ENHANCE_COST", 0, minimum=0),
            enhance_rate_per_minute=read.integer("PROMPT_ENHANCE_RATE_PER_MINUTE", 60, minimum=1),
            prompt_cache_entries=read.integer("PROMPT_CACHE_MAX_ENTRIES", 10_000, minimum=0),
            prompt_cache_ttl=read.number("PROMPT_CACHE_TTL_SECONDS", 86_400.0, minimum=0.0),
            idempotency_ttl=read.number("IDEMPOTENCY_TTL_SECONDS", 86_400.0, minimum=1.0),
            rate_limit_per_minute=read.integer("RATE_LIMIT_PER_MINUTE", 600, minimum=1),
            max_running_tasks=read.integer("MAX_RUNNING_TASKS_PER_TENANT", 8, minimum=1),
            upstream_timeout=read.number("UPSTREAM_TIMEOUT_SECONDS", 120.0, minimum=0.1),
            poll_interval=read.number("UPSTREAM_POLL_INTERVAL_SECONDS", 1.0, minimum=0.01),
            task_deadline=read.number("TASK_DEADLINE_SECONDS", 900.0, minimum=1.0),
            max_attempts=read.integer("TASK_MAX_ATTEMPTS", 3, minimum=1),
            retry_base_delay=read.number("RETRY_BASE_SECONDS", 0.5, minimum=0.0),
            retry_max_delay=read.number("RETRY_MAX_SECONDS", 15.0, minimum=0.0),
            worker_concurrency=read.integer("WORKER_CONCURRENCY", 16, minimum=1),
            lease_seconds=read.number("WORKER_LEASE_SECONDS", 30.0, minimum=0.5),
            idle_poll_seconds=read.number("WORKER_POLL_SECONDS", 1.0, minimum=0.01),
            run_workers=read.boolean("RUN_WORKERS", True),
            max_reference_upload_mb=read.number("MAX_REFERENCE_UPLOAD_MB", 10.0, minimum=0.01),
            max_reference_images=read.integer("MAX_REFERENCE_IMAGES", 4, minimum=1),
            max_reference_pixels=read.integer("MAX_REFERENCE_PIXELS", 2_000_000, minimum=4096),
            max_images_per_task=read.integer("MAX_IMAGES_PER_TASK", 4, minimum=1, maximum=4),
            max_prompt_chars=read.integer("MAX_PROMPT_CHARS", 4000, minimum=1, maximum=4000),
            max_output_image_mb=read.number("MAX_OUTPUT_IMAGE_MB", 32.0, minimum=0.1),
            max_reference_pixels_in=read.integer("MAX_REFERENCE_PIXELS_IN", 40_000_000, minimum=4096),
            decode_concurrency=read.integer("DECODE_CONCURRENCY", 2, minimum=1),
            quality_min_stddev=read.number("QUALITY_MIN_STDDEV", 2.0, minimum=0.0),
            quality_aspect_tolerance=read.number("QUALITY_ASPECT_TOLERANCE", 0.05, minimum=0.0),
            prompt_models=tuple(read.csv("PROMPT_MODELS")),
            prompt_max_output_tokens=read.integer("PROMPT_MAX_OUTPUT_TOKENS", 600, minimum=16),
            metrics_token=read.optional_text("METRICS_TOKEN"),
            end_user_rate_limit_per_minute=read.integer("END_USER_RATE_LIMIT_PER_MINUTE", 60, minimum=1),
            end_user_max_running_tasks=read.integer("END_USER_MAX_RUNNING_TASKS", 2, minimum=1),
            header_timeout=read.number("HTTP_HEADER_TIMEOUT_SECONDS", 10.0, minimum=0.1),
            keep_alive_timeout=read.number("HTTP_KEEP_ALIVE_SECONDS", 75.0, minimum=0.1),
            max_connections=read.integer("HTTP_MAX_CONNECTIONS", 2048, minimum=1),
            stream_idle_seconds=read.number("STREAM_IDLE_SECONDS", 60.0, minimum=0.1),
            upstream_cooldown_seconds=read.number("UPSTREAM_COOLDOWN_SECONDS", 30.0, minimum=0.0),
            upstream_breaker_failures=read.integer("UPSTREAM_BREAKER_FAILURES", 3, minimum=1),
            upstream_breaker_cooldown_seconds=read.number("UPSTREAM_BREAKER_COOLDOWN_SECONDS", 5.0, minimum=0.0),
            upstreams_file=Path(upstreams_file) if upstreams_file else None,
            upstreams=instances,
            upstream_keys=keys,
            adapter_modules=adapter_modules,
            model_protocols=check_protocols(list(instances)),
            gc_interval_seconds=read.number("GC_INTERVAL_SECONDS", 3600.0, minimum=0.0),
            reference_retention_hours=read.number("REFERENCE_RETENTION_HOURS", 168.0, minimum=0.0),
            result_retention_days=read.number("RESULT_RETENTION_DAYS", 30.0, minimum=0.0, maximum=MAX_RETENTION_DAYS),
            max_canvas_pixels=read.integer("MAX_CANVAS_PIXELS", 16_000_000, minimum=4096),
            max_canvas_steps=read.integer("MAX_CANVAS_STEPS", 200, minimum=1),
            encryption_keys=read.encryption_keys("ENCRYPTION_KEYS"),
            openai_wait_seconds=read.number("OPENAI_WAIT_SECONDS", 120.0, minimum=1.0),
            openai_url_ttl_seconds=read.number("OPENAI_URL_TTL_SECONDS", 900.0, minimum=1.0),
            public_base_url=read.optional_url("PUBLIC_BASE_URL"),
            webhooks_allow_private=read.boolean("WEBHOOKS_ALLOW_PRIVATE", False),
            webhooks_timeout_seconds=read.number("WEBHOOKS_TIMEOUT_SECONDS", 10.0, minimum=0.1, maximum=60.0),
            webhooks_retry_schedule=read.delays("WEBHOOKS_RETRY_SCHEDULE", "5,30,120,600,3600,21600,86400"),
        )
        _check_urls(settings)
        if settings.end_user_token_secret is not None and len(settings.end_user_token_secret) < 32:
            raise SettingsError("END_USER_TOKEN_SECRET: use at least 32 characters")
        return settings


def _check_urls(settings: Settings) -> None:
    scheme = settings.database_url.split(":", 1)[0]
    if scheme not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise SettingsError("DATABASE_URL: use sqlite+aiosqlite:///path or postgresql+asyncpg://…")
    # With an upstreams file, the key may be one an instance names (`api_key_env`) rather than a stray one.
    if settings.upstream_base_url is None and settings.upstream_api_key and settings.upstreams_file is None:
        raise SettingsError("CHATGPT2API_API_KEY: set CHATGPT2API_BASE_URL too, or unset the key to run offline")
    if settings.upstream_base_url is not None and not settings.upstream_api_key:
        raise SettingsError("CHATGPT2API_API_KEY: required when CHATGPT2API_BASE_URL is set")
    storage = urlsplit(settings.storage_url)
    if storage.scheme not in ("", "file", "s3") or (storage.scheme == "s3" and not storage.netloc):
        raise SettingsError("STORAGE_URL: expected a directory (a path or file://path) or s3://bucket/prefix")


class _Reader:
    """Typed reads of one variable each, failing with the variable's name."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def _raw(self, name: str) -> str | None:
        value = self._env.get(name)
        if value is None or not value.strip():
            return None
        return value.strip()

    def _parse(self, name: str, default: T, parse: Callable[[str], T], expected: str) -> T:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            return parse(raw)
        except ValueError:
            raise SettingsError(f"{name}: expected {expected}, got {raw!r}") from None

    def text(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def optional_text(self, name: str) -> str | None:
        return self._raw(name)

    def csv(self, name: str) -> list[str]:
        raw = self._raw(name)
        return [item.strip() for item in raw.split(",") if item.strip()] if raw else []

    def optional_url(self, name: str) -> str | None:
        raw = self._raw(name)
        if raw is None:
            return None
        parts = urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SettingsError(f"{name}: expected an http(s) URL, got {raw!r}")
        return raw.rstrip("/")

    def choice(self, name: str, default: str, options: tuple[str, ...], *, upper: bool = False) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        value = raw.upper() if upper else raw.lower()
        if value not in options:
            raise SettingsError(f"{name}: expected one of {', '.join(options)}, got {raw!r}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}: expected true or false, got {raw!r}")

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self._parse(name, default, int, "an integer")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise SettingsError(f"{name}: expected an integer {bound}, got {value}")
        return value

    def number(self, name: str, default: float, *, minimum: float, maximum: float | None = None) -> float:
        value = self._parse(name, default, float, "a number")
        if not value >= minimum or (maximum is not None and not value <= maximum):
            bound = f"between {minimum:g} and {maximum:g}" if maximum is not None else f"of at least {minimum}"
            raise SettingsError(f"{name}: expected a number {bound}, got {value}")
        return value

    def delays(self, name: str, default: str) -> tuple[float, ...]:
        """A comma-separated list of 1 to 20 delays in seconds, each between 0 and 7 days."""
        raw = self._raw(name) or default
        try:
            delays = tuple(float(item) for item in raw.split(","))
        except ValueError:
            raise SettingsError(f"{name}: expected seconds separated by commas, such as {default!r}") from None
        if not 1 <= len(delays) <= 20 or not all(0 <= delay <= 7 * 86400 for delay in delays):
            raise SettingsError(f"{name}: expected 1 to 20 delays of 0 to 604800 seconds, got {raw!r}")
        return delays

    def encryption_keys(self, name: str) -> tuple[bytes, ...]:
        keys = tuple(_encryption_key(name, i, item) for i, item in enumerate(self.csv(name), start=1))
        if len(set(keys)) != len(keys):
            raise SettingsError(f"{name}: the same key is listed twice")
        return keys

    def prices(self, name: str, default: str) -> dict[str, int]:
        raw = self._raw(name) or default
        prices: dict[str, int] = {}
        for item in raw.split(","):
            quality, _, credits = item.partition("=")
            quality = quality.strip()
            if quality not in QUALITIES or not credits.strip().isdigit() or int(credits) < 1:
                raise SettingsError(f"{name}: expected quality=credits pairs such as {default!r}, got {raw!r}")
            prices[quality] = int(credits)
        missing = [quality for quality in QUALITIES if quality not in prices]
        if missing:
            raise SettingsError(f"{name}: no price for {', '.join(missing)}")
        return prices


ENCRYPTION_KEY_BYTES = 32


def _encryption_key(name: str, position: int, item: str) -> bytes:
    """One key of the list: 32 bytes in base64 (standard or URL-safe alphabet, padding optional). The error names
    the key by its position only, never by its value."""
    text = item.strip().replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != ENCRYPTION_KEY_BYTES:
        raise SettingsError(
            f"{name}: key {position} is not {ENCRYPTION_KEY_BYTES} bytes in base64 "
            "(make one with `imagegen keys generate`)"
        )
    return key


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments ignored; surrounding quotes removed."""
    if not path.is_file():
        return {}
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or "=" not in stripped:
            continue
        key, _, value = stripped.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip().removeprefix("export ").strip()] = value
    return values
