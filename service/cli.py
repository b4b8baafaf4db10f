"""The `imagegen` command: run the API and workers, migrate, manage tenants and credits, audit the ledger, export the
OpenAPI spec, and generate images on a running service."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import msgspec
import uvicorn

from service import client
from service.app import create_app
from service.clock import utcnow
from service.connections import bounded_protocol, concurrency_limit, is_loopback
from service.credits.audit import AuditReport, audit_ledger
from service.db.engine import Database
from service.db.migrations import upgrade
from service.errors import ServiceError
from service.images.storage import open_store
from service.images.sweep import SweepReport, default_grace_seconds, sweep
from service.observability import configure_logging
from service.process import running
from service.providerkeys.keyring import Keyring, generate_key
from service.providerkeys.service import ProviderKeys, RotationReport
from service.settings import Settings, SettingsError
from service.tenants.keycache import KeyCache
from service.tenants.service import create_tenant as create
from service.tenants.service import grant_credits as grant
from service.upstream.offline import run_offline_upstream
from service.upstream.registry import import_adapter_modules
from service.upstream.schemas import UpstreamList
from service.upstream_config import SAMPLE

DEFAULT_SPEC = Path("openapi/openapi.json")


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"imagegen: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _check_upstream_types(settings: Settings) -> None:
    """Every instance's type is known (after importing the file's adapter modules), or start-up stops on one line."""
    try:
        import_adapter_modules(settings)
    except SettingsError as exc:
        print(f"imagegen: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _configure_logging(settings: Settings) -> None:
    configure_logging(settings.log_level)


def _migrate(settings: Settings) -> None:
    upgrade(settings.database_url)


ADMIN_KEY_FLOOR = 32


def _check_admin_key(settings: Settings, host: str) -> None:
    """A short admin key is a guessable one: refuse it where others can reach the service, warn on loopback."""
    key = settings.admin_api_key
    if key is None or len(key) >= ADMIN_KEY_FLOOR:
        return
    if not is_loopback(host):
        print(
            f"imagegen: configuration error: ADMIN_API_KEY: use at least {ADMIN_KEY_FLOOR} characters when serving "
            f"on {host} (a shorter key is accepted on loopback only)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    logging.getLogger("service.cli").warning(
        "ADMIN_API_KEY is shorter than %d characters: accepted on loopback only", ADMIN_KEY_FLOOR
    )


def serve(args: argparse.Namespace) -> None:
    settings = _settings()
    _configure_logging(settings)
    _check_admin_key(settings, args.host)
    _check_upstream_types(settings)
    if settings.auto_migrate:
        _migrate(settings)
    app = create_app(settings)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        http=bounded_protocol(settings, app),
        limit_concurrency=concurrency_limit(settings),
    )


def worker(_: argparse.Namespace) -> None:
    settings = _settings()
    _configure_logging(settings)
    _check_upstream_types(settings)
    if settings.auto_migrate:
        _migrate(settings)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with running(settings, workers=True):
            logging.getLogger("service.worker").info("workers running")
            await stop.wait()

    asyncio.run(run())


def migrate(_: argparse.Namespace) -> None:
    settings = _settings()
    _configure_logging(settings)
    _migrate(settings)
    print("database is at the newest revision")


def create_tenant(args: argparse.Namespace) -> None:
    settings = _settings()
    _migrate(settings)

    async def run() -> None:
        db = Database(settings.database_url)
        try:
            tenant, api_key = await create(db, args.name, args.credits)
        finally:
            await db.dispose()
        print(f"tenant_id={tenant.id}")
        print(f"api_key={api_key}")

    asyncio.run(run())


def grant_credits(args: argparse.Namespace) -> None:
    settings = _settings()
    _migrate(settings)

    async def run() -> None:
        db = Database(settings.database_url)
        try:
            entry = await grant(db, args.tenant_id, args.amount, args.reason)
        except ServiceError as exc:
            print(f"imagegen: {exc.detail}", file=sys.stderr)
            raise SystemExit(1) from None
        finally:
            await db.dispose()
        print(msgspec.json.encode(entry).decode())

    asyncio.run(run())


def audit(args: argparse.Namespace) -> None:
    settings = _settings()

    async def run() -> AuditReport:
        db = Database(settings.database_url)
        try:
            return await audit_ledger(db)
        finally:
            await db.dispose()

    report = asyncio.run(run())
    print("\n".join(report.lines()))
    if not report.clean or (args.expect_finished and report.unfinished):
        raise SystemExit(1)


def gc(args: argparse.Namespace) -> None:
    settings = _settings()
    _configure_logging(settings)
    if settings.auto_migrate:
        _migrate(settings)
    grace = default_grace_seconds(settings) if args.grace_seconds is None else args.grace_seconds
    if grace < 0:
        print("imagegen: --grace-seconds must not be negative", file=sys.stderr)
        raise SystemExit(2)

    async def run() -> SweepReport:
        db = Database(settings.database_url)
        try:
            return await sweep(
                db,
                open_store(settings.storage_url),
                now=utcnow(),
                retention=timedelta(hours=settings.reference_retention_hours),
                grace=timedelta(seconds=grace),
                result_retention_days=settings.result_retention_days,
                dry_run=args.dry_run,
            )
        finally:
            await db.dispose()

    print("\n".join(asyncio.run(run()).lines()))


def rotate_keys(_: argparse.Namespace) -> None:
    settings = _settings()
    if not settings.encryption_keys:
        print("imagegen: configuration error: ENCRYPTION_KEYS: set it to rotate under its first key", file=sys.stderr)
        raise SystemExit(2)
    _migrate(settings)

    async def run() -> RotationReport:
        db = Database(settings.database_url)
        try:
            keyring = Keyring(settings.encryption_keys)
            return await ProviderKeys(settings=settings, db=db, keyring=keyring, keys=KeyCache(db)).rotate()
        finally:
            await db.dispose()

    report = asyncio.run(run())
    print("\n".join(report.lines()))
    if report.unreadable:
        raise SystemExit(1)


def new_encryption_key(_: argparse.Namespace) -> None:
    print(generate_key())


def openapi(args: argparse.Namespace) -> None:
    # Generated from the defaults, never from the caller's environment, so the document is the same everywhere.
    app = create_app(Settings.from_mapping({}))
    document = json.dumps(app.openapi_schema.to_schema(), indent=2, ensure_ascii=False) + "\n"
    if args.check:
        committed = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if committed != document:
            print(
                f"imagegen: {args.output} differs from the code; run `imagegen openapi` and commit it", file=sys.stderr
            )
            raise SystemExit(1)
        print(f"{args.output} is up to date")
        return
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(document, encoding="utf-8")
    print(f"wrote {args.output}")


def upstreams(args: argparse.Namespace) -> None:
    """`imagegen upstreams`: the instances of a running service as its admin API shows them; `sample`: a documented
    upstreams file."""
    if args.action == "sample":
        print(SAMPLE, end="")
        return
    key = os.environ.get("ADMIN_API_KEY") or Settings.from_env().admin_api_key
    if not key:
        print("imagegen: set ADMIN_API_KEY to read the upstreams of a running service", file=sys.stderr)
        raise SystemExit(2)
    request = urllib.request.Request(  # noqa: S310 - the operator's own service URL
        args.url.rstrip("/") + "/api/admin/upstreams", headers={"Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            body = response.read()
    except urllib.error.HTTPError as exc:
        print(f"imagegen: the service answered {exc.code}", file=sys.stderr)
        raise SystemExit(1) from None
    except (urllib.error.URLError, OSError) as exc:
        print(f"imagegen: cannot reach {args.url} ({getattr(exc, 'reason', exc)})", file=sys.stderr)
        raise SystemExit(1) from None
    if args.json:
        print(body.decode())
        return
    print("\n".join(upstream_lines(msgspec.json.decode(body, type=UpstreamList))))


def upstream_lines(listing: UpstreamList) -> list[str]:
    """The instances as an aligned table, one row each."""

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}ms"

    rows = [["NAME", "TYPE", "MODELS", "PRIO", "WEIGHT", "STATE", "BREAKER", "IN-FLIGHT", "ERROR", "P50", "P95"]]
    for item in listing.items:
        breaker: str = item.breaker.state
        if item.breaker.state != "closed":
            breaker += f" ({item.breaker.consecutive_failures} failures, {item.breaker.retry_in_seconds:.0f}s)"
        if item.breaker.held_tenants:
            breaker += f" ({item.breaker.held_tenants} tenants held)"
        rows.append(
            [
                item.name,
                item.type,
                ",".join(item.models),
                str(item.priority),
                f"{item.weight:g}",
                item.state,
                breaker,
                f"{item.in_flight}/{item.max_concurrency}",
                item.recent_error or "-",
                seconds(item.latency_p50_seconds),
                seconds(item.latency_p95_seconds),
            ]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    if not listing.attempts_seen:
        lines.append("(this process runs no workers: breakers and latencies are those of each worker process)")
    return lines


def offline_upstream(args: argparse.Namespace) -> None:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    run_offline_upstream(args.host, args.port, args.api_key, args.latency)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagegen", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("serve", help="run the API with in-process workers")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=serve)

    commands.add_parser("worker", help="run workers only").set_defaults(func=worker)
    commands.add_parser("migrate", help="upgrade the database to the newest revision").set_defaults(func=migrate)

    tenants = commands.add_parser("tenants", help="manage tenants").add_subparsers(dest="action", required=True)
    p = tenants.add_parser("create", help="create a tenant; prints its id and API key")
    p.add_argument("name")
    p.add_argument("--credits", type=int, default=0)
    p.set_defaults(func=create_tenant)

    credits = commands.add_parser("credits", help="manage credits").add_subparsers(dest="action", required=True)
    p = credits.add_parser("grant", help="grant (or, negative, deduct) credits")
    p.add_argument("tenant_id")
    p.add_argument("amount", type=int)
    p.add_argument("--reason", default="granted from the command line")
    p.set_defaults(func=grant_credits)

    keys = commands.add_parser("keys", help="the keys that encrypt tenants' provider keys").add_subparsers(
        dest="action", required=True
    )
    p = keys.add_parser(
        "rotate",
        help="re-encrypt every stored provider key under the first key of ENCRYPTION_KEYS; exits 1 when some key "
        "cannot be read with the listed keys",
    )
    p.set_defaults(func=rotate_keys)
    keys.add_parser("generate", help="print a new random key for ENCRYPTION_KEYS").set_defaults(func=new_encryption_key)

    p = commands.add_parser("audit", help="check the ledger's invariants; exits 1 on any lost or doubled credit")
    p.add_argument("--expect-finished", action="store_true", help="also fail while any task is queued or running")
    p.set_defaults(func=audit)

    p = commands.add_parser(
        "gc", help="delete stored images no task needs: orphans, and results and references past retention"
    )
    p.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    p.add_argument(
        "--grace-seconds",
        type=float,
        help="delete unreferenced objects only once older than this (default: twice TASK_DEADLINE_SECONDS, "
        "at least an hour)",
    )
    p.set_defaults(func=gc)

    p = commands.add_parser("openapi", help="write the OpenAPI document")
    p.add_argument("--output", type=Path, default=DEFAULT_SPEC)
    p.add_argument("--check", action="store_true", help="fail when the file differs from what the code generates")
    p.set_defaults(func=openapi)

    p = commands.add_parser("generate", help="generate an image on a running service (key from IMAGEGEN_API_KEY)")
    p.add_argument("prompt")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default: %(default)s)")
    p.add_argument("--size", default="auto", help="auto, 1:1, 16:9, 9:16 or WxH")
    p.add_argument("--n", type=int, default=1, help="number of images")
    p.add_argument("--candidates", type=int, default=1, help="make this many candidates and keep the best (2-4)")
    p.add_argument("--quality", default="auto", choices=["auto", "low", "medium", "high"])
    p.add_argument("--model")
    p.add_argument("--image", type=Path, help="a reference image to edit from")
    p.add_argument("--enhance", choices=["details", "creative"], help="enhance the prompt first")
    p.add_argument("--style", help="a style preset (GET /api/prompts/styles)")
    p.add_argument("--out", type=Path, help="where to write the image (default: <task id>.png)")
    p.set_defaults(func=client.run)

    p = commands.add_parser(
        "upstreams", help="show the upstream instances of a running service, or print a sample UPSTREAMS_FILE"
    )
    p.add_argument("action", nargs="?", choices=["show", "sample"], default="show")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the admin API's JSON as it is")
    p.set_defaults(func=upstreams)

    p = commands.add_parser("offline-upstream", help="run the built-in offline upstream on its own")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--api-key", required=True)
    p.add_argument("--latency", type=float, default=1.0)
    p.set_defaults(func=offline_upstream)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)
