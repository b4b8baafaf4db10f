"""`imagegen generate`: a command-line client for a running service.

Submits a prompt (with an optional reference image and enhancement), shows the task's progress while it runs,
downloads the image(s) and writes a JSON sidecar next to each with what reproduces it: task id, model, prompts, size,
cost, timings and hashes. The API key comes from `IMAGEGEN_API_KEY`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import mimetypes
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import aiohttp

TERMINAL = {"completed", "failed", "cancelled"}
SPINNER = "|/-\\"
EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}


class ClientError(Exception):
    """What went wrong, in one line for the terminal."""


def _problem(status: int, body: bytes) -> ClientError:
    try:
        problem = json.loads(body)
        return ClientError(f"{problem.get('detail') or problem.get('title')} ({status}, {problem.get('code')})")
    except ValueError:
        return ClientError(f"the service answered {status}")


@dataclass(frozen=True, slots=True)
class Order:
    url: str
    api_key: str
    fields: dict[str, Any]
    reference: tuple[str, bytes] | None
    out: Path | None


async def _submit(session: aiohttp.ClientSession, order: Order) -> dict[str, Any]:
    if order.reference is None:
        request = session.post("/api/images/generate", json=order.fields)
    else:
        form = aiohttp.FormData()
        for name, value in order.fields.items():
            form.add_field(name, str(value))
        filename, data = order.reference
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        form.add_field("image", data, filename=filename, content_type=content_type)
        request = session.post("/api/images/generate", data=form)
    async with request as response:
        body = await response.read()
        if response.status != 202:
            raise _problem(response.status, body)
        return dict(json.loads(body))


async def _follow(session: aiohttp.ClientSession, task_id: str, progress: TextIO) -> dict[str, Any]:
    started = time.monotonic()
    turn = 0
    while True:
        async with session.get(f"/api/images/tasks/{task_id}") as response:
            body = await response.read()
            if response.status != 200:
                raise _problem(response.status, body)
            task = dict(json.loads(body))
        progress.write(f"\r{SPINNER[turn % 4]} {task['status']:<10} {time.monotonic() - started:6.1f}s")
        progress.flush()
        if task["status"] in TERMINAL:
            progress.write("\n")
            return task
        turn += 1
        await asyncio.sleep(0.25)


def _seconds(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds(), 3)


def sidecar(
    task: dict[str, Any], image: dict[str, Any], file: Path, data: bytes, reference: bytes | None
) -> dict[str, Any]:
    """What reproduces one downloaded image."""
    return {
        "task_id": task["id"],
        "model": task["model"],
        "prompt": task["prompt"],
        "final_prompt": task["final_prompt"],
        "revised_prompt": task["revised_prompt"],
        "enhance": task["enhance"],
        "style": task["style"],
        "size": task["size"],
        "quality": task["quality"],
        "n": task["n"],
        "candidates": task.get("candidates", 1),
        "cost": task["cost"],
        "refunded": task["refunded"],
        "timings": {
            "created_at": task["created_at"],
            "started_at": task["started_at"],
            "finished_at": task["finished_at"],
            "queued_seconds": _seconds(task["created_at"], task["started_at"]),
            "running_seconds": _seconds(task["started_at"], task["finished_at"]),
        },
        "image": {
            "file": file.name,
            "index": image["index"],
            "content_type": image["content_type"],
            "width": image["width"],
            "height": image["height"],
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "candidate": image.get("candidate"),
            "score": (image.get("quality") or {}).get("score"),
        },
        "reference_sha256": hashlib.sha256(reference).hexdigest() if reference is not None else None,
    }


def _output_path(out: Path | None, task: dict[str, Any], image: dict[str, Any]) -> Path:
    extension = EXTENSIONS.get(image["content_type"], ".bin")
    base = out or Path(f"{task['id']}{extension}")
    if task["n"] == 1 or len(task["images"]) == 1:
        return base
    return base.with_name(f"{base.stem}-{image['index']}{base.suffix or extension}")


async def generate(order: Order, progress: TextIO) -> list[tuple[Path, bytes, dict[str, Any]]]:
    """Submit, follow and download: each image's path, bytes and sidecar."""
    headers = {"Authorization": f"Bearer {order.api_key}"}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(base_url=order.url.rstrip("/") + "/", headers=headers, timeout=timeout) as session:
        submitted = await _submit(session, order)
        progress.write(
            f"task {submitted['id']}: {submitted['cost']} credit(s), {submitted['remaining_credits']} left\n"
        )
        task = await _follow(session, submitted["id"], progress)
        if task["status"] != "completed":
            error = task.get("error") or {}
            raise ClientError(
                f"the task {task['status']}: {error.get('message') or 'no image'} "
                f"({task['refunded']} credit(s) refunded)"
            )
        reference = order.reference[1] if order.reference else None
        downloads = []
        for entry in task["images"]:
            async with session.get(entry["url"].lstrip("/")) as response:
                data = await response.read()
                if response.status != 200:
                    raise _problem(response.status, data)
            path = _output_path(order.out, task, entry)
            downloads.append((path, data, sidecar(task, entry, path, data, reference)))
        return downloads


def run(args: Any) -> None:
    api_key = os.environ.get("IMAGEGEN_API_KEY")
    if not api_key:
        print("imagegen: set IMAGEGEN_API_KEY to your API key", file=sys.stderr)
        raise SystemExit(2)
    fields: dict[str, Any] = {"prompt": args.prompt, "size": args.size, "n": args.n, "quality": args.quality}
    if args.enhance:
        fields["enhance"] = args.enhance
    if args.style:
        fields["style"] = args.style
    if args.model:
        fields["model"] = args.model
    if args.candidates > 1:
        fields["candidates"] = args.candidates
    reference = (args.image.name, args.image.read_bytes()) if args.image else None
    order = Order(url=args.url, api_key=api_key, fields=fields, reference=reference, out=args.out)
    try:
        downloads = asyncio.run(generate(order, sys.stderr))
    except ClientError as exc:
        print(f"imagegen: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except aiohttp.ClientError as exc:
        print(f"imagegen: cannot reach {args.url} ({type(exc).__name__})", file=sys.stderr)
        raise SystemExit(1) from None
    for path, data, meta in downloads:
        path.write_bytes(data)
        path.with_name(path.name + ".json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        print(path)
