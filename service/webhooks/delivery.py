"""The dispatcher: delivers the outbox's due deliveries, in the processes that run workers.

It claims due deliveries with a lease (their next attempt time moves past the attempt's timeout, so those of a
dispatcher that died become due again; on PostgreSQL claims skip rows another dispatcher is claiming), POSTs each
body signed for this attempt, and records the attempt: 2xx is delivered; any other status, a redirect (never
followed), a timeout or a connection error is retried after the next delay of WEBHOOKS_RETRY_SCHEDULE, and once the
schedule is spent the delivery is `failed`. A destination the SSRF rule refuses (`addresses.py`) fails at once, with
no request made. An outbox commit in this process wakes it at once; one in another process through a NOTIFY on
PostgreSQL; besides, it looks for due deliveries every WORKER_POLL_SECONDS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import SplitResult

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from service.clock import utcnow
from service.db.engine import Database, Record
from service.ids import new_id
from service.providerkeys.keyring import Keyring, KeyringError, Sealed
from service.settings import Settings
from service.webhooks import repository
from service.webhooks.addresses import DestinationRefused, parse_url, resolve
from service.webhooks.outbox import WEBHOOK_CHANNEL, Outbox
from service.webhooks.signing import headers, secret_label

log = logging.getLogger("service.webhooks")

CONCURRENCY = 16
RESPONSE_KEPT_BYTES = 1024
KEPT_ATTEMPTS = 50
LEASE_MARGIN_SECONDS = 30.0


class _Pinned(AbstractResolver):
    """Answers the URL's host with the one address that was checked, so the connection goes exactly there; the Host
    header and the TLS server name stay the URL's."""

    def __init__(self, host: str, address: str) -> None:
        self.host = host
        self.address = address

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        if host != self.host:
            raise OSError(f"no pinned address for {host}")
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        return [
            ResolveResult(
                hostname=host, host=self.address, port=port, family=family, proto=0, flags=socket.AI_NUMERICHOST
            )
        ]

    async def close(self) -> None:
        return None


class Dispatcher:
    def __init__(self, *, settings: Settings, db: Database, keyring: Keyring, outbox: Outbox) -> None:
        self.settings = settings
        self.db = db
        self.keyring = keyring
        self.outbox = outbox
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{new_id()[-8:]}"
        self._attempts: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._dispatch(), name="webhook-dispatch"),
            asyncio.create_task(self._hear_announcements(), name="webhook-announcements"),
        ]

    async def stop(self) -> None:
        for task in [*self._loops, *self._attempts]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._attempts, return_exceptions=True)

    async def _hear_announcements(self) -> None:
        ring = self.outbox.doorbell.set
        async with self.db.listening(WEBHOOK_CHANNEL, lambda _: ring(), lambda up: ring() if up else None):
            await asyncio.Event().wait()

    async def _dispatch(self) -> None:
        doorbell = self.outbox.doorbell
        while True:
            doorbell.clear()
            try:
                while free := CONCURRENCY - len(self._attempts):
                    claimed = await self._claim(free)
                    if len(claimed) < free:
                        break
            except Exception:
                log.exception("claiming webhook deliveries failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.idle_poll_seconds):
                    await doorbell.wait()

    async def _claim(self, most: int) -> list[Record]:
        now = utcnow()
        lease = timedelta(seconds=self.settings.webhooks_timeout_seconds + LEASE_MARGIN_SECONDS)
        async with self.db.transaction() as tx:
            claimed = await repository.claim_due(tx, owner=self.owner, now=now, lease_until=now + lease, most=most)
            endpoints = {row.id: row for row in await repository.signing_of(tx, [d.endpoint_id for d in claimed])}
        for delivery in claimed:
            attempt = asyncio.create_task(self._deliver(delivery, endpoints[delivery.endpoint_id]))
            self._attempts.add(attempt)
            attempt.add_done_callback(self._attempt_done)
        return claimed

    def _attempt_done(self, attempt: asyncio.Task[None]) -> None:
        self._attempts.discard(attempt)
        self.outbox.doorbell.set()

    async def _deliver(self, delivery: Record, endpoint: Record) -> None:
        try:
            await self._attempt_and_record(delivery, endpoint)
        except Exception:
            log.exception("webhook delivery %s: the attempt failed unexpectedly", delivery.id)

    def _secrets(self, endpoint: Record, now: datetime) -> list[str]:
        label = secret_label(endpoint.id)
        secrets = [
            self.keyring.open(
                Sealed(endpoint.ciphertext, endpoint.key_id), tenant_id=endpoint.tenant_id, instance=label
            )
        ]
        if (
            endpoint.previous_ciphertext is not None
            and endpoint.previous_expires_at
            and endpoint.previous_expires_at > now
        ):
            previous = Sealed(endpoint.previous_ciphertext, endpoint.previous_key_id)
            secrets.append(self.keyring.open(previous, tenant_id=endpoint.tenant_id, instance=label))
        return secrets

    async def _attempt_and_record(self, delivery: Record, endpoint: Record) -> None:
        at = utcnow()
        started = time.perf_counter()
        status_code: int | None = None
        error: str | None = None
        excerpt: str | None = None
        final = False
        try:
            secrets = self._secrets(endpoint, at)
            parts = parse_url(endpoint.url)
            address = await resolve(parts, allow_private=self.settings.webhooks_allow_private)
            body = delivery.body.encode()
            signed = headers(secrets, delivery.id, int(time.time()), body)
            status_code, excerpt = await self._post(parts, address, signed, body)
        except DestinationRefused as refused:
            log.warning("webhook delivery %s refused: %s", delivery.id, refused)
            error, final = "destination_not_allowed", True
        except KeyringError:
            error = "secret_unavailable"
        except ValueError:
            error, final = "invalid_url", True
        except TimeoutError:
            error = "timeout"
        except (aiohttp.ClientError, OSError) as exc:
            error = "connection_failed"
            log.info("webhook delivery %s: %s", delivery.id, type(exc).__name__)
        duration_ms = round((time.perf_counter() - started) * 1000, 1)
        delivered = status_code is not None and 200 <= status_code < 300
        await self._record(
            delivery,
            at=at,
            duration_ms=duration_ms,
            status_code=status_code,
            error=error,
            excerpt=excerpt,
            delivered=delivered,
            final=final,
        )

    async def _post(self, parts: SplitResult, address: str, signed: dict[str, str], body: bytes) -> tuple[int, str]:
        """POST `body` to the URL through `address`; the status and at most RESPONSE_KEPT_BYTES of the answer."""
        connector = aiohttp.TCPConnector(
            resolver=_Pinned(parts.hostname or "", address), force_close=True, use_dns_cache=False
        )
        timeout = aiohttp.ClientTimeout(total=self.settings.webhooks_timeout_seconds)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session,
            asyncio.timeout(self.settings.webhooks_timeout_seconds),
            session.post(parts.geturl(), data=body, headers=signed, allow_redirects=False) as response,
        ):
            start = await response.content.read(RESPONSE_KEPT_BYTES)
            return response.status, start.decode("utf-8", "replace")

    def _next_attempt(self, attempts_made: int, now: datetime) -> datetime | None:
        """When to try again after `attempts_made` failed attempts, or None when the schedule is spent."""
        schedule = self.settings.webhooks_retry_schedule
        if attempts_made > len(schedule):
            return None
        return now + timedelta(seconds=schedule[attempts_made - 1])

    async def _record(
        self,
        delivery: Record,
        *,
        at: datetime,
        duration_ms: float,
        status_code: int | None,
        error: str | None,
        excerpt: str | None,
        delivered: bool,
        final: bool,
    ) -> None:
        attempt: dict[str, Any] = {
            "at": at.isoformat(),
            "duration_ms": duration_ms,
            "status_code": status_code,
            "error": error,
            "response_body": excerpt,
        }
        attempts = [*delivery.attempts, attempt][-KEPT_ATTEMPTS:]
        now = utcnow()
        retry_at = None if delivered or final else self._next_attempt(delivery.attempt_count + 1, now)
        status = "delivered" if delivered else "pending" if retry_at is not None else "failed"
        async with self.db.transaction() as tx:
            recorded = await repository.record_attempt(
                tx,
                delivery.id,
                owner=self.owner,
                attempt_count=delivery.attempt_count,
                attempts=attempts,
                status=status,
                next_attempt_at=retry_at,
                delivered_at=now if delivered else None,
            )
        if not recorded:
            log.info("webhook delivery %s changed during its attempt; this attempt is not recorded", delivery.id)
        elif retry_at is not None:
            # Wake for the retry when it is due rather than at the next poll, which may come later.
            delay = (retry_at - utcnow()).total_seconds()
            asyncio.get_running_loop().call_later(max(delay, 0.0), self.outbox.doorbell.set)
