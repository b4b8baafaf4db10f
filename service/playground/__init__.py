"""The playground: one plain HTML page (no build step) that talks to the API with a tenant's key or an end user's
token, served at `/`."""

from __future__ import annotations

from pathlib import Path

from litestar import MediaType, Response, get

PAGE = (Path(__file__).parent / "index.html").read_bytes()
# The page runs only its own inline script and talks only to this service; images arrive as blob: URLs.
POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@get("/", include_in_schema=False, media_type=MediaType.HTML)
async def playground() -> Response[bytes]:
    return Response(PAGE, media_type=MediaType.HTML, headers={"Content-Security-Policy": POLICY})
