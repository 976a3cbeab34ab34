"""consumer.fetch.pool, the shared keep-alive pool: reuse, bounds, stale connections, SSRF pinning.

Every server here is an HTTP/1.1 (keep-alive) server on a loopback address that counts the
TCP connections it accepts; every client connect is checked to be loopback too.
"""

from __future__ import annotations

import io
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from consumer.config import FetchSettings
from consumer.errors import EventError
from consumer.fetch import pool, watchdog
from consumer.fetch.references import fetch_bytes, fetch_with_retries
from tests.support.network import guard_loopback, self_signed_certificate


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (20, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()
BIG = b"\0" * (256 * 1024)  # far over the byte cap used below, in more than one read


class _Handler(BaseHTTPRequestHandler):
    """/face.png, /slow (the same after 0.3 s), /big, /missing (404 with a body),
    /chain/<n> (n redirects to /face.png), /trickle (headers at a byte per 0.2 s).

    One instance serves one connection, so `served` counts that connection's requests.
    """

    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed ACK
    server: KeepAliveServer
    served = 0

    def do_GET(self) -> None:
        self.served += 1
        self.server.requests += 1
        if self.server.drop_reused and self.served > 1:
            # As if the idle timeout struck just as the request arrived: no answer.
            self.close_connection = True
            return
        if self.path == "/face.png":
            self._send(200, PNG)
        elif self.path == "/slow":
            time.sleep(0.3)
            self._send(200, PNG)
        elif self.path == "/big":
            self._send(200, BIG)
        elif self.path == "/missing":
            self._send(404, b"not here")
        elif self.path.startswith("/chain/"):
            left = int(self.path.rsplit("/", 1)[1])
            self._send(302, b"", location="/face.png" if left <= 1 else f"/chain/{left - 1}")
        elif self.path == "/trickle":
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + b"x" * 100:
                time.sleep(0.2)
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    break
            self.close_connection = True
        else:
            self._send(404, b"")

    def _send(self, status: int, body: bytes, location: str | None = None) -> None:
        self.send_response(status)
        if location is not None:
            self.send_header("Location", location)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class KeepAliveServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # handler threads may sit on idle keep-alive connections

    def __init__(
        self,
        address: tuple[str, int] = ("127.0.0.1", 0),
        *,
        idle_timeout_s: float = 5.0,
        drop_reused: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        # The handler's timeout is the server's idle keep-alive timeout.
        super().__init__(address, type("Handler", (_Handler,), {"timeout": idle_timeout_s}))
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.drop_reused = drop_reused
        self.accepted = 0  # TCP connections
        self.requests = 0

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        self.accepted += 1  # the one serving thread calls this
        super().process_request(request, client_address)


@contextmanager
def serving(server: KeepAliveServer) -> Iterator[KeepAliveServer]:
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def keepalive() -> Iterator[KeepAliveServer]:
    with serving(KeepAliveServer()) as server:
        yield server


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An empty pool before and after; any connect beyond loopback fails the test."""
    guard_loopback(monkeypatch)
    pool.close_idle_connections()
    yield
    pool.close_idle_connections()


LOOPBACK = FetchSettings(allow_hosts=("127.0.0.0/8",), retries=0, timeout_s=5.0)


class Resolver:
    """A fake getaddrinfo: each call answers the next address (the last repeats)."""

    def __init__(self, *answers: str) -> None:
        self.answers = answers
        self.calls = 0

    def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        self.calls += 1
        address = self.answers[min(self.calls, len(self.answers)) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))]


def test_sequential_fetches_share_one_connection(keepalive: KeepAliveServer) -> None:
    for _ in range(10):
        assert fetch_bytes(f"{keepalive.url}/face.png", LOOPBACK) == PNG
    assert keepalive.accepted == 1 and keepalive.requests == 10
    assert pool.idle_connections() == 1


def test_redirect_hops_and_small_error_bodies_reuse_the_connection(
    keepalive: KeepAliveServer,
) -> None:
    assert fetch_bytes(f"{keepalive.url}/chain/3", LOOPBACK) == PNG
    with pytest.raises(EventError) as info:
        fetch_bytes(f"{keepalive.url}/missing", LOOPBACK)
    assert info.value.kind == "image_not_found"
    assert fetch_bytes(f"{keepalive.url}/face.png", LOOPBACK) == PNG
    assert keepalive.accepted == 1 and keepalive.requests == 6


def test_concurrent_fetches_open_at_most_one_connection_per_thread(
    keepalive: KeepAliveServer,
) -> None:
    threads, each = 4, 6
    settings = LOOPBACK.model_copy(update={"pool_max_idle_per_host": threads})
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(each):
                assert fetch_bytes(f"{keepalive.url}/face.png", settings) == PNG
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=20)
    assert errors == []
    assert keepalive.requests == threads * each
    assert 1 <= keepalive.accepted <= threads
    assert pool.idle_connections() <= threads


def _concurrently(url: str, settings: FetchSettings, threads: int) -> None:
    """`threads` fetches of `url` at once; /slow makes them overlap, so each has a connection."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            assert fetch_bytes(url, settings) == PNG
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=20)
    assert errors == []


def test_idle_connections_per_host_are_bounded(keepalive: KeepAliveServer) -> None:
    settings = LOOPBACK.model_copy(update={"pool_max_idle_per_host": 2})
    _concurrently(f"{keepalive.url}/slow", settings, 4)
    assert keepalive.accepted == 4
    assert pool.idle_connections() == 2


def test_idle_connections_in_all_are_bounded_oldest_out() -> None:
    settings = LOOPBACK.model_copy(update={"pool_max_idle": 3, "pool_max_idle_per_host": 4})
    with serving(KeepAliveServer()) as first, serving(KeepAliveServer()) as second:
        _concurrently(f"{first.url}/slow", settings, 4)
        assert first.accepted == 4 and pool.idle_connections() == 3
        assert fetch_bytes(f"{second.url}/face.png", settings) == PNG
        assert pool.idle_connections() == 3  # one of first's went to make room
        assert fetch_bytes(f"{second.url}/face.png", settings) == PNG
        assert second.accepted == 1


def test_pool_max_idle_zero_disables_reuse(keepalive: KeepAliveServer) -> None:
    settings = LOOPBACK.model_copy(update={"pool_max_idle": 0})
    for _ in range(3):
        assert fetch_bytes(f"{keepalive.url}/face.png", settings) == PNG
    assert keepalive.accepted == 3 and pool.idle_connections() == 0


def test_a_body_cut_short_by_the_byte_cap_closes_the_connection(
    keepalive: KeepAliveServer,
) -> None:
    settings = LOOPBACK.model_copy(update={"max_bytes": 1024})
    with pytest.raises(EventError) as info:
        fetch_bytes(f"{keepalive.url}/big", settings)
    assert info.value.kind == "image_too_large"
    assert pool.idle_connections() == 0
    assert fetch_bytes(f"{keepalive.url}/face.png", settings) == PNG
    assert keepalive.accepted == 2


def test_a_connection_the_server_closed_while_idle_is_not_used() -> None:
    with serving(KeepAliveServer(idle_timeout_s=0.2)) as server:
        assert fetch_bytes(f"{server.url}/face.png", LOOPBACK) == PNG
        time.sleep(0.6)  # the server hangs up the idle connection
        assert fetch_with_retries(f"{server.url}/face.png", LOOPBACK) == (PNG, 1)
        assert server.accepted == 2


def test_a_connection_idle_for_too_long_is_not_reused(
    keepalive: KeepAliveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pool, "_IDLE_MAX_AGE_S", 0.1)
    assert fetch_bytes(f"{keepalive.url}/face.png", LOOPBACK) == PNG
    time.sleep(0.2)  # the server would still take it; the pool does not
    assert fetch_bytes(f"{keepalive.url}/face.png", LOOPBACK) == PNG
    assert keepalive.accepted == 2 and pool.idle_connections() == 1


def test_a_pooled_connection_dropped_at_the_request_is_retried_once_for_free() -> None:
    # The connection looks fine in the pool, but the server closes it instead of answering.
    with serving(KeepAliveServer(drop_reused=True)) as server:
        assert fetch_bytes(f"{server.url}/face.png", LOOPBACK) == PNG
        # retries=0: had the stale connection counted as a failed attempt, this would raise.
        assert fetch_with_retries(f"{server.url}/face.png", LOOPBACK) == (PNG, 1)
        assert server.accepted == 2 and server.requests == 3


def test_the_deadline_still_holds_on_a_pooled_connection(keepalive: KeepAliveServer) -> None:
    settings = LOOPBACK.model_copy(update={"timeout_s": 1.0})
    assert fetch_bytes(f"{keepalive.url}/face.png", settings) == PNG
    start = time.monotonic()
    with pytest.raises(EventError) as info:
        fetch_bytes(f"{keepalive.url}/trickle", settings)
    assert time.monotonic() - start < 5 * 1.0  # a hang limit, not a speed figure
    assert info.value.retriable and "took over 1.0s" in info.value.message
    # The watchdog's shutdown was not mistaken for a stale connection (no second connect).
    assert keepalive.accepted == 1 and pool.idle_connections() == 0


def test_one_watchdog_thread_and_a_heap_that_does_not_grow(keepalive: KeepAliveServer) -> None:
    for _ in range(200):  # deadlines far ahead: finished watches must not pile up
        assert fetch_bytes(f"{keepalive.url}/face.png", LOOPBACK) == PNG
    names = [thread.name for thread in threading.enumerate()]
    assert names.count("http-fetch-deadlines") == 1
    assert len(watchdog._watchdog._heap) <= 64 + 1


def _server_on(address: str, port: int) -> KeepAliveServer | None:
    try:
        return KeepAliveServer((address, port))
    except OSError:
        return None


def test_a_pooled_connection_is_not_used_once_the_host_resolves_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two servers on one port of two loopback addresses (Linux routes all of 127/8 to lo).
    for _ in range(5):
        first = KeepAliveServer(("127.0.0.1", 0))
        second = _server_on("127.0.0.2", first.port)
        if second is not None:
            break
        first.server_close()
    else:
        pytest.skip("127.0.0.2 is not usable here")
    resolver = Resolver("127.0.0.1", "127.0.0.2", "127.0.0.1")
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    url = f"http://images.test:{first.port}/face.png"
    with serving(first), serving(second):
        assert fetch_bytes(url, LOOPBACK) == PNG
        assert fetch_bytes(url, LOOPBACK) == PNG  # now resolves to 127.0.0.2
        assert (first.accepted, second.accepted) == (1, 1)
        assert fetch_bytes(url, LOOPBACK) == PNG  # back to 127.0.0.1: its idle connection
        assert (first.accepted, second.accepted) == (1, 1)
        assert first.requests == 2 and second.requests == 1
    assert resolver.calls == 3  # resolved and checked every time, pooled or not


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for images.test."""
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


def test_tls_connections_are_reused(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr(pool.PinnedHTTPSConnection, "_tls", trusting)
    monkeypatch.setattr(socket, "getaddrinfo", Resolver("127.0.0.1"))
    with serving(KeepAliveServer(tls=server_tls)) as server:
        for _ in range(3):
            assert fetch_bytes(f"https://images.test:{server.port}/chain/1", LOOPBACK) == PNG
        assert server.accepted == 1 and server.requests == 6
