"""What a running process holds, built once by the composition root (`service/process.py`) with every part complete;
`service/app.py` hands each part to the handlers that name it."""

from __future__ import annotations

from dataclasses import dataclass

from service.canvases.service import CanvasService
from service.db.engine import Database
from service.images.storage import BlobStore
from service.prompts.service import Enhancer
from service.providerkeys.service import ProviderKeys
from service.ratelimit import RateLimiter
from service.settings import Settings
from service.tasks.service import TaskService
from service.tenants.keycache import KeyCache
from service.tenants.tokens import TokenSigner
from service.upstream.registry import Upstreams
from service.webhooks.service import Webhooks


@dataclass(frozen=True, slots=True)
class Runtime:
    settings: Settings
    db: Database
    store: BlobStore
    limiter: RateLimiter
    upstreams: Upstreams
    tokens: TokenSigner
    keys: KeyCache
    enhancer: Enhancer
    tasks: TaskService
    canvases: CanvasService
    provider_keys: ProviderKeys
    webhooks: Webhooks
