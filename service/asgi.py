"""ASGI entry point: `uvicorn --factory service.asgi:create_app`."""

from service.app import create_app

__all__ = ["create_app"]
