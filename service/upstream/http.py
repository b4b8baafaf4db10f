"""The HTTP client shared by the upstream adapters: one pooled aiohttp session per upstream, error classification,
and image downloads restricted to the upstream's own origin.

aiohttp is used because this client sits on every task's path and measured several times faster than httpx here.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import msgspec
import pybase64

from service.metrics import upstream_call
from service.upstream.base import GenerationResult, UpstreamError, error_for_status, under_tenant_key

log = logging.getLogger("service.upstream")

MAX_ERROR_BODY = 64 * 1024
# How recent another tenant's success must be for one tenant's failures to be held against that tenant alone.
OTHERS_SUCCESS_WINDOW = 60.0
MAX_JSON_BODY = 256 * 1024 * 1024
DOWNLOAD_PIECE = 256 * 1024


class UpstreamHealth:
    """A circuit breaker over one upstream's calls, as this process sees them.

    closed: calls go through. After `failures_to_open` transient failures in a row (timeouts, refused connections,
    5xx, 429) it opens for `cooldown_seconds`, and at once when the upstream says it cannot serve anyone (no quota,
    our key refused: a blocking error) for `block_seconds`: no new work meanwhile. Then it is half-open: one call may
    probe it (`begin`), and the probe's success closes it while its failure opens it again. Any answer that is not a
    transient failure counts as a success: the upstream is there.

    The worker pool claims no task of a model none of whose instances is available, so queued work waits instead of
    each task meeting the same refusal (see `service.upstream.registry`).

    A call made with a tenant's own key says nothing of ours: it is not counted at all (`own_key=False`, and the
    registry leaves a tenant key's attempts out of the instance's breaker), so a tenant's refused key never opens the
    breaker and its success never closes one.

    A breaker cannot tell a sick upstream from prompts that make it fail, so it looks at whose calls failed. When every
    failure of the run that reaches `failures_to_open` was one tenant's (the `tenant` given to `failed`) while another
    tenant's call succeeded within `OTHERS_SUCCESS_WINDOW` seconds, the instance works and the trouble is that tenant's:
    only its work is held back, for `cooldown_seconds` (`available(tenant)`). Its further failures hold it again, its
    success frees it, and the instance stays open to everyone else. Otherwise (the calls of two tenants or more failed,
    or nobody else's succeeded lately, as with a single tenant) the breaker opens for all, as on a blocking error.
    """

    def __init__(
        self,
        failures_to_open: int = 3,
        cooldown_seconds: float = 30.0,
        *,
        block_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str | None = None,
    ) -> None:
        self._name = name
        self._failures_to_open = failures_to_open
        self._cooldown_seconds = cooldown_seconds
        self._block_seconds = cooldown_seconds if block_seconds is None else block_seconds
        self._clock = clock
        self._consecutive_failures = 0
        self._open = False
        self._open_until = 0.0
        self._probe_until = 0.0
        self.last_error: str | None = None
        # The tenants whose calls failed since the last success, and the tenants held back until a time.
        self._run_tenants: set[str | None] = set()
        self._held: dict[str, float] = {}
        # The latest successes of the last two tenants that had one (tenant, when), newest first.
        self._successes: list[tuple[str | None, float]] = []

    @property
    def state(self) -> str:
        """`closed`, `open` or `half_open`."""
        if not self._open:
            return "closed"
        return "open" if self._clock() < self._open_until else "half_open"

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive_failures

    @property
    def held_tenants(self) -> int:
        """How many tenants' work is held back now."""
        now = self._clock()
        return sum(until > now for until in self._held.values())

    def available(self, tenant: str | None = None) -> bool:
        """Whether new work (of `tenant`, when given) may go to the upstream now: closed, or half-open with no probe
        under way; and the tenant not held back."""
        if tenant is not None and self._held and self._clock() < self._held.get(tenant, 0.0):
            return False
        if not self._open:
            return True
        now = self._clock()
        return now >= self._open_until and now >= self._probe_until

    def begin(self) -> None:
        """Work is going to the upstream; when half-open, it is the probe, and no other work goes until it ends (or
        outlives a cool-down, as a probe whose end was never reported would)."""
        now = self._clock()
        if self._open and now >= self._open_until:
            self._probe_until = now + max(self._cooldown_seconds, 1.0)
            if self._name is not None:
                log.info("upstream instance %s: breaker half-open, probing", self._name)

    def open_for(self, tenant: str | None = None) -> float:
        """Seconds until the breaker lets a probe (of `tenant`'s work, when given) through; 0 when it lets it through
        now."""
        if self.available(tenant):
            return 0.0
        held = self._held.get(tenant, 0.0) if tenant is not None else 0.0
        until = max(held, max(self._open_until, self._probe_until) if self._open else 0.0)
        return max(0.0, until - self._clock())

    def block(self, code: str) -> None:
        """The upstream says it cannot serve anyone: open at once, for the longer cool-down."""
        self.last_error = code
        self._trip(self._block_seconds)

    def succeeded(self, tenant: str | None = None) -> None:
        """A call (of `tenant`'s work, when given) succeeded: the breaker closes, and that tenant is no longer held."""
        if self._open and self._name is not None:
            log.info("upstream instance %s: breaker closed", self._name)
        self._consecutive_failures = 0
        self._open = False
        self._probe_until = 0.0
        self.last_error = None
        self._run_tenants.clear()
        if tenant is not None:
            self._held.pop(tenant, None)
        others = [success for success in self._successes if success[0] != tenant]
        self._successes = [(tenant, self._clock()), *others[:1]]

    def failed(self, code: str, tenant: str | None = None) -> None:
        """A transient failure of a call (of `tenant`'s work, when given)."""
        self._consecutive_failures += 1
        self.last_error = code
        self._run_tenants.add(tenant)
        if not self._open and self._consecutive_failures < self._failures_to_open:
            return
        if not self._open and tenant is not None and self._run_tenants == {tenant} and self._others_succeed(tenant):
            self._hold(tenant)
        else:
            self._trip(self._cooldown_seconds)

    def _others_succeed(self, tenant: str) -> bool:
        """Whether another tenant's call succeeded lately."""
        since = self._clock() - OTHERS_SUCCESS_WINDOW
        return any(other != tenant and when >= since for other, when in self._successes)

    def record(self, error: UpstreamError | None, tenant: str | None = None) -> None:
        """The end of one call (of `tenant`'s work, when given): its error, or None when it succeeded."""
        if error is None or not (error.blocking or error.transient):
            self.succeeded(tenant)
        elif error.blocking:
            self.block(error.code)
        else:
            self.failed(error.code, tenant)

    def _hold(self, tenant: str) -> None:
        now = self._clock()
        self._held = {other: until for other, until in self._held.items() if until > now}
        self._held[tenant] = now + self._cooldown_seconds
        if self._name is not None:
            log.warning(
                "upstream instance %s: tenant %s held back for %gs, its calls alone failing (%s); others' go through",
                self._name,
                tenant,
                self._cooldown_seconds,
                self.last_error,
            )

    def _trip(self, seconds: float) -> None:
        self._open = True
        self._open_until = self._clock() + seconds
        self._probe_until = 0.0
        if self._name is not None:
            log.warning("upstream instance %s: breaker open for %gs (%s)", self._name, seconds, self.last_error)

    @contextlib.contextmanager
    def watch(self, *, own_key: bool = True) -> Iterator[None]:
        """Count one call, unless it is made with a tenant's own key."""
        if not own_key:
            yield
            return
        try:
            yield
        except UpstreamError as exc:
            self.record(exc)
            raise
        self.record(None)


def origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


class UpstreamHTTP:
    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float,
        connections: int,
        health: UpstreamHealth | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.health = health
        self._origin = origin(self.base_url)
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10.0))
        # Streams may run longer than one request's limit, as long as bytes keep arriving.
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(timeout, 10.0), sock_read=timeout)
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            connector=aiohttp.TCPConnector(limit=connections, limit_per_host=connections),
            timeout=self._timeout,
            trust_env=False,
        )

    async def close(self) -> None:
        await self._session.close()

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    @contextlib.contextmanager
    def _call(self, what: str, api_key: str | None) -> Iterator[None]:
        """Count the call towards the upstream's health (when this client keeps one; an image instance's breaker counts
        whole attempts instead, in the registry), and turn transport failures into transient UpstreamErrors; under a
        tenant's key (`api_key`), a refusal of that key is the tenant's alone (`under_tenant_key`)."""
        watching = self.health.watch(own_key=api_key is None) if self.health is not None else contextlib.nullcontext()
        with watching, upstream_call():
            try:
                yield
            except UpstreamError as exc:
                if api_key is not None and exc.blocking:
                    raise under_tenant_key(exc) from None
                raise
            except TimeoutError:
                raise UpstreamError("upstream_timeout", f"{what} timed out", transient=True) from None
            except aiohttp.ClientError as exc:
                raise UpstreamError(
                    "upstream_unreachable", f"{what} failed ({type(exc).__name__})", transient=True
                ) from None

    async def request_json(self, method: str, path: str, *, api_key: str | None = None, **kwargs: Any) -> Any:
        """Send a request and decode a JSON answer, raising a classified UpstreamError on any failure; with
        `api_key`, a tenant's own key is the bearer instead of the instance's."""
        with self._call("The upstream request", api_key):
            async with self._session.request(
                method, self.url(path), allow_redirects=False, headers=_bearer(api_key), **kwargs
            ) as response:
                if response.status >= 300:
                    raise await _error_from(response)
                body = await response.read()
        try:
            return msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise UpstreamError(
                "upstream_bad_response", "The upstream answered with invalid JSON", transient=True
            ) from None

    async def open_stream(self, path: str, body: dict[str, Any]) -> aiohttp.ClientResponse:
        """POST and return the response once its status says the stream has begun; the caller releases it."""
        with self._call("The upstream stream", None):
            response = await self._session.post(
                self.url(path), json=body, allow_redirects=False, timeout=self._stream_timeout
            )
            if response.status >= 300:
                try:
                    raise await _error_from(response)
                finally:
                    response.release()
            return response

    async def result_from(
        self, items: list[Any], max_bytes: int, upstream_ids: list[str], api_key: str | None = None
    ) -> GenerationResult:
        """Collect the images of an upstream answer's data list (downloaded with `api_key` when given), and its
        revised prompt."""
        entries = [item for item in items if isinstance(item, dict)]
        images = [await self.image_from(item, max_bytes, api_key) for item in entries]
        revised = next((str(item["revised_prompt"]) for item in entries if item.get("revised_prompt")), None)
        return GenerationResult(images=images, revised_prompt=revised, upstream_ids=upstream_ids)

    async def image_from(self, item: dict[str, Any], max_bytes: int, api_key: str | None = None) -> bytes:
        """The bytes of one result image, given inline (`b64_json`) or by URL."""
        if isinstance(item.get("b64_json"), str):
            try:
                return pybase64.b64decode(item["b64_json"], validate=True)
            except (binascii.Error, ValueError):
                raise UpstreamError(
                    "upstream_bad_image", "The upstream image is not valid base64", transient=False
                ) from None
        if isinstance(item.get("url"), str):
            return await self.fetch_image(item["url"], max_bytes, api_key)
        raise UpstreamError("upstream_bad_response", "The upstream image has neither data nor a URL", transient=False)

    async def fetch_image(self, url: str, max_bytes: int, api_key: str | None = None) -> bytes:
        """Download an output image, only from the upstream's origin, with no redirects and a size limit."""
        absolute = urljoin(self.base_url + "/", url)
        if origin(absolute) != self._origin:
            raise UpstreamError(
                "upstream_image_unavailable", "The upstream pointed at an image outside its own origin", transient=False
            )
        with self._call("The upstream image download", api_key):
            async with self._session.get(absolute, allow_redirects=False, headers=_bearer(api_key)) as response:
                if response.status == 404 or 300 <= response.status < 400:
                    raise UpstreamError(
                        "upstream_image_unavailable",
                        f"The upstream image could not be fetched ({response.status})",
                        transient=False,
                    )
                if response.status >= 300:
                    raise await _error_from(response)
                if response.content_length is not None and response.content_length > max_bytes:
                    raise _too_large()
                return await _read_whole(response, max_bytes)


def _bearer(api_key: str | None) -> dict[str, str] | None:
    """The header that sends a tenant's own key instead of the session's."""
    return {"Authorization": f"Bearer {api_key}"} if api_key is not None else None


async def _read_whole(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """The whole body, however many pieces it arrives in, failing as soon as it grows past `max_bytes`.

    The session's total timeout bounds the whole download; a body cut short raises a payload error (transient).
    """
    body = bytearray()
    async for piece in response.content.iter_chunked(DOWNLOAD_PIECE):
        body += piece
        if len(body) > max_bytes:
            raise _too_large()
    return bytes(body)


def _too_large() -> UpstreamError:
    return UpstreamError("upstream_bad_image", "The upstream image is larger than allowed", transient=False)


async def _error_from(response: aiohttp.ClientResponse) -> UpstreamError:
    message = ""
    try:
        body = await asyncio.wait_for(response.content.read(MAX_ERROR_BODY), timeout=5)
        message = error_text(json.loads(body))
    except (ValueError, TimeoutError, aiohttp.ClientError):
        pass
    retry_after = _retry_after(response.headers.get("Retry-After"))
    return error_for_status(response.status, message, retry_after)


def error_text(payload: Any) -> str:
    """The text of an upstream error body in the shapes upstreams use: OpenAI's `{"error": {"message", "type",
    "code"}}` (type and code kept, since `insufficient_quota` may be only there), `{"error": "..."}`,
    `{"detail": "..."}` and chatgpt2api's `{"detail": {"error": "..."}}`."""
    if not isinstance(payload, dict):
        return ""
    error = payload.get("error")
    if error is None and "detail" in payload:
        error = payload["detail"]
        if isinstance(error, dict) and "error" in error and not isinstance(error.get("message"), str):
            error = error["error"]
    if isinstance(error, str):
        return error
    if isinstance(error, dict):
        message = str(error.get("message") or "")
        extra = dict.fromkeys(str(error[key]) for key in ("type", "code") if error.get(key))
        return " ".join([*([message] if message else []), *(f"({item})" for item in extra if item not in message)])
    return ""


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
