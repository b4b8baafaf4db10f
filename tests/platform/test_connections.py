"""Connections are bounded: slow headers, idle keep-alive connections, stalled stream readers and too many connections
are cut off while other clients keep being served; and a short admin key is refused off loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Service, Upstream, service_env, wait_until

HEADER_TIMEOUT = 5
KEEP_ALIVE = 2
MAX_CONNECTIONS = 12
SHORT_ADMIN_KEY = "dev-admin-key"
TRICKLED = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: a-very-slow-client\r\nAccept: */*\r\n\r\n"


@pytest.fixture(scope="module")
def bounded(upstream: Upstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = service_env(
        upstream,
        ADMIN_API_KEY=SHORT_ADMIN_KEY,
        HTTP_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT),
        HTTP_KEEP_ALIVE_SECONDS=str(KEEP_ALIVE),
        HTTP_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        STREAM_IDLE_SECONDS="1",
        PROMPT_ENHANCE_COST="2",
    )
    process = Service(tmp_path_factory.mktemp("bounded"), env)
    yield process
    process.stop()


def connect(service: Service, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer is not None:
        # Set before connecting, so the advertised window stays small and the server's sends back up quickly.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", service.port))
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (end of stream or reset); never consumes answer bytes that
    are still to be read, unless the connection is already over."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def read_answer(sock: socket.socket) -> bytes:
    """One complete small answer (headers and a Content-Length body) from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def read_to_end(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_trickled_headers_and_silent_connections_are_closed_while_others_are_served(bounded: Service) -> None:
    tricklers = [connect(bounded) for _ in range(3)]
    silent = [connect(bounded) for _ in range(3)]
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:
        for byte in TRICKLED:
            if stop.wait(1):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    threads = [threading.Thread(target=trickle, args=(sock,), daemon=True) for sock in tricklers]
    for thread in threads:
        thread.start()
    try:
        with httpx.Client(base_url=bounded.base_url, timeout=10) as client:
            for _ in range(5):
                assert client.get("/healthz").status_code == 200
                assert client.get("/api/prompts/styles").status_code == 401
        assert not any(closed_by_server(sock) for sock in tricklers + silent)
        # Cut off by the header deadline with no answer: the trickled request is far longer than the bytes it sent.
        for sock in tricklers + silent:
            wait_until(lambda sock=sock: closed_by_server(sock), 30, "a slow connection stayed open")
            assert read_to_end(sock) == b""
        with httpx.Client(base_url=bounded.base_url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200
    finally:
        stop.set()
        for sock in tricklers + silent:
            sock.close()


def test_an_idle_keep_alive_connection_is_closed_after_the_keep_alive_time(bounded: Service) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with connect(bounded) as sock:
        sock.sendall(request)
        assert read_answer(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(request)
        assert read_answer(sock).startswith(b"HTTP/1.1 200")
        wait_until(lambda: closed_by_server(sock), 30, "the idle connection stayed open")
        assert read_to_end(sock) == b""


def test_a_connection_idle_longer_than_a_client_pool_keeps_it_is_still_served(service: Service) -> None:
    """httpx and others drop a pooled connection after 5 s idle; the service must not close it first (with the old
    5 s keep-alive the two raced, and a request sent just as the server closed failed with a connection error)."""
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with connect(service) as sock:
        sock.sendall(request)
        assert read_answer(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6)
        assert not closed_by_server(sock)
        sock.sendall(request)
        assert read_answer(sock).startswith(b"HTTP/1.1 200")


def test_a_stream_reader_that_stops_reading_is_cut_off(bounded: Service, upstream: Upstream) -> None:
    tenant = bounded.new_tenant(credits=10, name="stalled-reader")
    upstream.settings(token_delay=0)
    # The offline model streams the prompt back word by word: a long prompt makes an answer far larger than the
    # socket buffers between us and the service.
    body = json.dumps({"prompt": "w " * 1990 + "stalled"}).encode()
    request = (
        b"POST /api/prompts/enhance HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer "
        + tenant.api_key.encode()
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    ended = '"route":"/api/prompts/enhance"'
    before = bounded.log_text().count(ended)
    with connect(bounded, receive_buffer=4096) as sock:
        sock.sendall(request)
        # Read nothing until the service has ended the request: it can only end by cutting this reader off.
        wait_until(lambda: bounded.log_text().count(ended) > before, 30, "the stalled stream was never ended")
        answer = read_to_end(sock)
    assert answer.startswith(b"HTTP/1.1 200") and b"data: {" in answer, answer[:500]
    assert b"[DONE]" not in answer
    # The enhancement did not finish, so its price comes back, once.
    wait_until(lambda: tenant.balance() == 10, 10, "the cut-off enhancement was not refunded")
    # A reader that keeps reading gets the whole of an answer as long.
    with tenant.client.stream("POST", "/api/prompts/enhance", json={"prompt": "w " * 1990 + "read"}) as response:
        assert response.status_code == 200
        assert "data: [DONE]" in response.read().decode()
    assert tenant.balance() == 8


def test_past_the_connection_limit_requests_are_answered_503(bounded: Service) -> None:
    held = [connect(bounded) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in held:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        with connect(bounded) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = read_to_end(extra)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"connection: close" in answer.lower()
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: httpx.get(f"{bounded.base_url}/healthz", timeout=5).status_code == 200, 30, "still refused")


def test_a_short_admin_key_is_accepted_on_loopback_with_a_warning(bounded: Service) -> None:
    with bounded.admin() as admin:
        assert admin.get("/api/admin/tenants").status_code == 200
    warnings = [
        json.loads(line) for line in bounded.log_text().splitlines() if line.startswith("{") and "ADMIN_API_KEY" in line
    ]
    assert len(warnings) == 1 and warnings[0]["level"] == "WARNING", warnings
    assert SHORT_ADMIN_KEY not in bounded.log_text()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10"])  # noqa: S104 - refused before binding
def test_a_short_admin_key_is_refused_off_loopback_before_binding(host: str, tmp_path: Path) -> None:
    env = {**os.environ, "ADMIN_API_KEY": "x" * 31, "DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--host", host, "--port", "1"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("imagegen: configuration error: ADMIN_API_KEY: "), result.stderr
    assert "x" * 31 not in result.stderr
    # It stopped before doing anything: it migrates before it binds, and no database was made.
    assert list(tmp_path.iterdir()) == []
