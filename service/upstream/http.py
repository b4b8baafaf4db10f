"""The HTTP client shared by the upstream adapters: one pooled aiohttp session per upstream, error classification,
and image downloads restricted to the upstream's own origin.

aiohttp is used because this client sits on every task's path and measured several times faster than httpx here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import msgspec

from service.metrics import upstream_call
from service.upstream.base import GenerationResult, UpstreamError, error_for_status, under_tenant_key

MAX_ERROR_BODY = 64 * 1024
MAX_JSON_BODY = 256 * 1024 * 1024
DOWNLOAD_PIECE = 256 * 1024


class UpstreamHealth:
    """What the last upstream calls of this process say: degraded after a run of transient failures (timeouts,
    refused connections, 5xx, 429), or at once when the upstream says it cannot serve (no quota, our key refused);
    healthy again at the first success.

    A blocking error also starts a cool-down of `cooldown_seconds`: while it runs the worker pool claims no new tasks,
    so queued work waits instead of each task meeting the same refusal.

    A call made with a tenant's own key (`own_key=False`) counts as the others do, except that its success says
    nothing of our key: it does not lift a block.
    """

    def __init__(self, failures_to_degrade: int = 3, cooldown_seconds: float = 30.0) -> None:
        self._failures_to_degrade = failures_to_degrade
        self._cooldown_seconds = cooldown_seconds
        self._consecutive_failures = 0
        self._blocked = False
        self._cool_until = 0.0
        self.last_error: str | None = None

    @property
    def degraded(self) -> bool:
        return self._blocked or self._consecutive_failures >= self._failures_to_degrade

    def cooldown_left(self) -> float:
        """Seconds until work may go to the upstream again; 0 when it may now."""
        return max(0.0, self._cool_until - time.monotonic())

    def block(self, code: str) -> None:
        self._blocked = True
        self.last_error = code
        self._cool_until = time.monotonic() + self._cooldown_seconds

    @contextlib.contextmanager
    def watch(self, *, own_key: bool = True) -> Iterator[None]:
        try:
            yield
        except UpstreamError as exc:
            if exc.blocking:
                self.block(exc.code)
            elif exc.transient:
                self._consecutive_failures += 1
                self.last_error = exc.code
            raise
        self._consecutive_failures = 0
        if own_key or not self._blocked:
            self._blocked = False
            self.last_error = None


def origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


class UpstreamHTTP:
    def __init__(
        self, base_url: str, api_key: str | None, *, timeout: float, connections: int, health: UpstreamHealth
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
        """Count the call towards the upstream's health, and turn transport failures into transient UpstreamErrors;
        under a tenant's key (`api_key`), a refusal of that key is the tenant's alone (`under_tenant_key`)."""
        with self.health.watch(own_key=api_key is None), upstream_call():
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
                return base64.b64decode(item["b64_json"], validate=True)
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
