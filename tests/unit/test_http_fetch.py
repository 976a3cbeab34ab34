"""Safe fetching: the SSRF guard, DNS pinning, checked redirects, deadlines, file roots and
data URIs. (The keep-alive pool has its own tests in test_http_pool.py.)

Forbidden addresses come from a monkeypatched resolver and every socket connect is
guarded, so no test ever connects anywhere but the loopback servers it starts itself.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image
from pydantic import ValidationError

from consumer.config import FetchSettings
from consumer.decode.images import decode_image
from consumer.errors import EventError
from consumer.fetch import pool
from consumer.fetch.references import fetch_bytes, fetch_with_retries
from consumer.fetch.ssrf import forbidden_reason, resolve_checked
from tests.support.network import guard_loopback, self_signed_certificate

PUBLIC = "93.184.216.34"  # a global address; never actually connected to


@pytest.fixture(autouse=True)
def _no_pooled_connections() -> Iterator[None]:
    """Each test starts and ends with an empty keep-alive pool."""
    pool.close_idle_connections()
    yield
    pool.close_idle_connections()


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (20, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def addrinfo(address: str, port: int) -> tuple[Any, ...]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sockaddr: tuple[Any, ...] = (address, port, 0, 0) if ":" in address else (address, port)
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)


class Resolver:
    """A fake getaddrinfo: each call answers the next list of addresses (the last repeats)."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.calls: list[str] = []

    def __call__(self, host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        self.calls.append(host)
        answer = self.answers[min(len(self.calls), len(self.answers)) - 1]
        return [addrinfo(a, port) for a in answer]


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Records every connect; lets loopback through and fails the test on anything else."""
    seen = guard_loopback(monkeypatch)

    def no_create_connection(*args: Any, **kwargs: Any) -> socket.socket:
        pytest.fail("socket.create_connection does a second DNS lookup and must not be used")

    monkeypatch.setattr(socket, "create_connection", no_create_connection)
    return seen


class _Handler(BaseHTTPRequestHandler):
    """/face.png: an image; /to?<url>: 302 there; /chain/<n>: n redirects, then the image."""

    hosts: ClassVar[list[str]] = []  # Host headers seen; each server's subclass has its own
    user_agents: ClassVar[list[str]] = []  # User-Agent headers seen by every server

    def do_GET(self) -> None:
        self.hosts.append(self.headers.get("Host", ""))
        _Handler.user_agents.append(self.headers.get("User-Agent", ""))
        if self.path.startswith("/to?"):
            self._redirect(self.path[len("/to?") :])
        elif self.path.startswith("/chain/"):
            left = int(self.path.rsplit("/", 1)[1])
            self._redirect("/face.png" if left <= 1 else f"/chain/{left - 1}")
        elif self.path == "/face.png":
            data = png_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_error(404)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, int, list[str]]]:
    """A loopback server: (base URL, port, Host headers seen)."""
    hosts: list[str] = []
    handler = type("Handler", (_Handler,), {"hosts": hosts})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    try:
        yield f"http://127.0.0.1:{port}", port, hosts
    finally:
        httpd.shutdown()
        httpd.server_close()


LOOPBACK = FetchSettings(allow_hosts=("127.0.0.1",), retries=0)

FORBIDDEN = [
    "10.0.0.5",
    "172.16.3.4",
    "192.168.1.1",
    "127.0.0.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # carrier-grade NAT
    "224.0.0.1",
    "0.0.0.0",
    "255.255.255.255",
    "240.0.0.1",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:169.254.169.254",
    "64:ff9b::a00:5",  # NAT64 of 10.0.0.5
    "2002:a00:5::1",  # 6to4 of 10.0.0.5
]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_forbidden_addresses_are_refused_without_connecting(
    address: str, monkeypatch: pytest.MonkeyPatch, connects: list[tuple[Any, ...]]
) -> None:
    resolver = Resolver([address])
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    settings = FetchSettings(retries=3, retry_backoff_s=0)
    with pytest.raises(EventError) as info:
        fetch_with_retries("http://images.example/face.png", settings)
    error = info.value
    assert error.kind == "image_fetch_refused" and not error.retriable
    assert error.attempts == 1  # permanent: never retried
    assert "images.example" in error.message and str(ipaddress.ip_address(address)) in error.message
    assert "fetch.allow_hosts" in error.message
    assert connects == [] and resolver.calls == ["images.example"]


def test_one_forbidden_address_among_public_ones_refuses_the_host(
    monkeypatch: pytest.MonkeyPatch, connects: list[tuple[Any, ...]]
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", Resolver([PUBLIC, "10.1.2.3"]))
    with pytest.raises(EventError) as info:
        fetch_bytes("https://images.example/x.png", FetchSettings())
    assert info.value.kind == "image_fetch_refused" and "10.1.2.3" in info.value.message
    assert connects == []


@pytest.mark.parametrize("address", [PUBLIC, "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


def test_the_checked_address_is_the_one_connected_to(
    monkeypatch: pytest.MonkeyPatch, connects: list[tuple[Any, ...]]
) -> None:
    # DNS rebinding: the first answer is public, a second lookup would say loopback.
    resolver = Resolver([PUBLIC], ["127.0.0.1"])
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    attempted: list[tuple[Any, ...]] = []

    def refuse(sock: socket.socket, address: Any) -> None:
        attempted.append(tuple(address))
        raise ConnectionRefusedError("not really connecting")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(EventError) as info:
        fetch_bytes("http://rebind.example:8080/face.png", FetchSettings())
    assert info.value.kind == "image_fetch_failed" and info.value.retriable
    assert attempted == [(PUBLIC, 8080)]
    assert resolver.calls == ["rebind.example"]  # exactly one lookup


def test_pinned_connection_keeps_the_host_header(
    server: tuple[str, int, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    connects: list[tuple[Any, ...]],
) -> None:
    _, port, hosts = server
    # First answer loopback (allowed by CIDR), any later lookup a forbidden address.
    resolver = Resolver(["127.0.0.1"], ["10.0.0.5"])
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    settings = FetchSettings(allow_hosts=("127.0.0.0/8",))
    data = fetch_bytes(f"http://images.test:{port}/face.png", settings)
    assert decode_image(data, 10_000).size == (20, 10)
    assert resolver.calls == ["images.test"]
    assert connects == [("127.0.0.1", port)]
    assert hosts == [f"images.test:{port}"]


def test_allow_hosts_by_name_is_case_insensitive(
    server: tuple[str, int, list[str]],
    monkeypatch: pytest.MonkeyPatch,
    connects: list[tuple[Any, ...]],
) -> None:
    _, port, _ = server
    monkeypatch.setattr(socket, "getaddrinfo", Resolver(["127.0.0.1"]))
    settings = FetchSettings(allow_hosts=("IMAGES.internal.",))
    assert fetch_bytes(f"http://images.internal:{port}/face.png", settings) == png_bytes()
    with pytest.raises(EventError) as info:
        fetch_bytes(f"http://other.internal:{port}/face.png", settings)
    assert info.value.kind == "image_fetch_refused"


def test_allow_hosts_by_cidr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", Resolver(["10.0.0.5", "10.200.0.1"]))
    checked = resolve_checked("images.internal", 80, ("10.0.0.0/8",))
    assert [sockaddr[0] for _, sockaddr in checked] == ["10.0.0.5", "10.200.0.1"]
    with pytest.raises(EventError) as info:
        resolve_checked("images.internal", 80, ("10.0.0.0/16",))
    assert info.value.kind == "image_fetch_refused" and "10.200.0.1" in info.value.message


def test_bad_allow_hosts_and_relative_file_roots_are_config_errors() -> None:
    with pytest.raises(ValidationError, match="neither a hostname"):
        FetchSettings(allow_hosts=("http://x/",))
    with pytest.raises(ValidationError, match="must be absolute"):
        FetchSettings(file_roots=(Path("relative"),))


def test_redirect_to_an_allowed_host_is_followed(
    server: tuple[str, int, list[str]], connects: list[tuple[Any, ...]]
) -> None:
    url, _, _ = server
    assert fetch_bytes(f"{url}/to?/face.png", LOOPBACK) == png_bytes()
    assert fetch_bytes(f"{url}/chain/3", LOOPBACK) == png_bytes()  # exactly max_redirects
    assert len(connects) == 2 + 4  # one connection per hop, all to the checked address


def test_too_many_redirects_fail(server: tuple[str, int, list[str]]) -> None:
    url, _, _ = server
    with pytest.raises(EventError) as info:
        fetch_bytes(f"{url}/chain/4", LOOPBACK)
    assert info.value.kind == "image_fetch_failed" and not info.value.retriable
    assert "max_redirects=3" in info.value.message
    with pytest.raises(EventError):
        fetch_bytes(f"{url}/to?/face.png", LOOPBACK.model_copy(update={"max_redirects": 0}))


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.5/x.png",
        "http://[::1]:1/x.png",
        "ftp://127.0.0.1/x.png",
        "file:///etc/passwd",
        "http://user@127.0.0.1/x.png",
    ],
)
def test_redirect_to_a_forbidden_target_is_refused(
    location: str, server: tuple[str, int, list[str]], connects: list[tuple[Any, ...]]
) -> None:
    url, port, _ = server
    with pytest.raises(EventError) as info:
        fetch_bytes(f"{url}/to?{location}", LOOPBACK)
    assert info.value.kind == "image_fetch_refused" and not info.value.retriable
    assert connects == [("127.0.0.1", port)]  # only the first hop connected


@pytest.mark.parametrize(
    "url", ["http://user@images.example/x.png", "https://user:secret@images.example/x.png"]
)
def test_userinfo_is_refused_before_resolving(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = Resolver([PUBLIC])
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    with pytest.raises(EventError) as info:
        fetch_bytes(url, FetchSettings())
    assert info.value.kind == "image_fetch_refused" and "user info" in info.value.message
    assert resolver.calls == []


def test_total_deadline_holds(tmp_path: Path) -> None:
    from tests.support.http_server import ImageServer

    (tmp_path / "face.png").write_bytes(png_bytes())
    settings = LOOPBACK.model_copy(update={"timeout_s": 0.3})
    with ImageServer(tmp_path) as images, pytest.raises(EventError) as info:
        fetch_bytes(f"{images.url}/sleep/3/face.png", settings)
    assert info.value.kind == "image_fetch_failed" and info.value.retriable


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for images.test."""
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[int]:
    cert, key = certificate
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (_Handler,), {"hosts": []}))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_https_verifies_the_hostname_over_the_pinned_address(
    tls_server: int,
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    connects: list[tuple[Any, ...]],
) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", Resolver(["127.0.0.1"]))
    settings = FetchSettings(allow_hosts=("127.0.0.1",), retries=0)
    # The system CA store does not trust the test certificate: refused, not retried.
    with pytest.raises(EventError) as untrusted:
        fetch_bytes(f"https://images.test:{tls_server}/face.png", settings)
    assert untrusted.value.kind == "image_fetch_failed" and not untrusted.value.retriable
    trusting = ssl.create_default_context(cafile=str(certificate[0]))
    monkeypatch.setattr(pool.PinnedHTTPSConnection, "_tls", trusting)
    # Trusted: SNI and the certificate check use images.test while connecting to 127.0.0.1.
    assert fetch_bytes(f"https://images.test:{tls_server}/face.png", settings) == png_bytes()
    # The same certificate for another name fails hostname verification.
    with pytest.raises(EventError) as wrong_name:
        fetch_bytes(f"https://127.0.0.1:{tls_server}/face.png", settings)
    assert wrong_name.value.kind == "image_fetch_failed"
    assert all(address[0] == "127.0.0.1" for address in connects)


def _file_uri(path: str) -> str:
    return "file://" + path


def test_file_roots_allow_inside_and_refuse_escapes(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside.png"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "in.png").write_bytes(b"inside")
    outside.write_bytes(b"secret")
    (root / "link.png").symlink_to(outside)
    settings = FetchSettings(file_roots=(root,))
    assert fetch_bytes((root / "sub" / "in.png").as_uri(), settings) == b"inside"
    assert fetch_bytes(_file_uri(f"{root}/sub/../sub/in.png"), settings) == b"inside"
    for uri in [
        outside.as_uri(),
        _file_uri(f"{root}/../outside.png"),
        _file_uri(f"{root}/sub/%2e%2e/%2e%2e/outside.png"),
        (root / "link.png").as_uri(),
        _file_uri(f"{root}x/in.png"),  # a sibling with the root's name as a prefix
    ]:
        with pytest.raises(EventError) as info:
            fetch_bytes(uri, settings)
        assert info.value.kind == "image_fetch_refused", uri
        assert "fetch.file_roots" in info.value.message


@pytest.mark.parametrize("settings", [FetchSettings(), FetchSettings(file_roots=())])
def test_file_images_are_refused_without_file_roots(
    tmp_path: Path, settings: FetchSettings
) -> None:
    """The default: no folder is readable, so an event cannot pick a file of the host."""
    image = tmp_path / "face.png"
    image.write_bytes(b"an image")
    for uri in [image.as_uri(), "file:///etc/passwd", (tmp_path / "missing.png").as_uri()]:
        with pytest.raises(EventError) as info:
            fetch_bytes(uri, settings)
        assert info.value.kind == "image_fetch_refused" and not info.value.retriable, uri
        message = info.value.message
        # It names the setting and how to set it, so the fix needs no documentation.
        assert "fetch.file_roots is empty" in message, message
        assert """EMOTION_WORKER_FETCH__FILE_ROOTS='["/srv/frames"]'""" in message, message


def test_null_file_roots_is_a_config_error_naming_the_fix() -> None:
    # null used to mean "any path": it must not quietly turn into "none" (or "any").
    with pytest.raises(ValidationError, match=r'no longer takes null.*\["/srv/frames"\]'):
        FetchSettings(file_roots=None)  # type: ignore[arg-type]


def test_file_roots_accept_a_symlinked_root(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.png").write_bytes(b"a")
    (tmp_path / "alias").symlink_to(real)
    settings = FetchSettings(file_roots=(tmp_path / "alias",))
    assert fetch_bytes((tmp_path / "alias" / "a.png").as_uri(), settings) == b"a"


def _data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def test_data_uri_decodes() -> None:
    data = fetch_bytes(_data_uri(png_bytes()), FetchSettings())
    assert decode_image(data, 10_000).size == (20, 10)


@pytest.mark.parametrize(
    ("uri", "kind"),
    [
        (_data_uri(b"x" * 3000), "image_too_large"),
        ("data:image/png;base64,iVBOR!!!", "image_undecodable"),
        ("data:image/png;base64,iVBOR", "image_undecodable"),  # bad padding
        ("data:image/png;base64,iVBO Rw==", "image_undecodable"),  # whitespace is not base64
        ("data:image/png,rawbytes", "image_undecodable"),  # only base64 is accepted
    ],
)
def test_bad_data_uris(uri: str, kind: str) -> None:
    with pytest.raises(EventError) as info:
        fetch_bytes(uri, FetchSettings(max_data_uri_bytes=2048))
    assert info.value.kind == kind and not info.value.retriable


# A response that is never complete at one byte per pause: it outlasts any deadline below.
TRICKLED = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Padding: " + b"x" * 200 + b"\r\n\r\nok"


class SlowServer:
    """A raw loopback server that reads a request, then answers one byte per `pause_s`.

    `pause_s=None`: never answers. `tls`: each connection does a TLS handshake first; without
    it, an https client's handshake meets silence.
    """

    def __init__(
        self,
        pause_s: float | None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.pause_s = pause_s
        self.tls = tls
        self.stop = threading.Event()
        self.accepted = 0
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.05)
        self.port: int = self.listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]

    def __enter__(self) -> SlowServer:
        self._threads[0].start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in list(self._threads):
            thread.join(timeout=2)
        self.listener.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with suppress(OSError), conn:
            conn.settimeout(5)
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(4096)
                if not data:
                    return
                request += data
            if self.pause_s is None:
                self.stop.wait(10)
                return
            for byte in TRICKLED:
                if self.stop.wait(self.pause_s):
                    return
                conn.sendall(bytes([byte]))


def _timed_fetch(url: str, settings: FetchSettings) -> tuple[EventError, float]:
    start = time.monotonic()
    with pytest.raises(EventError) as info:
        fetch_bytes(url, settings)
    return info.value, time.monotonic() - start


@pytest.mark.parametrize("pause_s", [0.2, 0.5])
def test_trickled_headers_cannot_outlast_the_total_deadline(
    pause_s: float, connects: list[tuple[Any, ...]]
) -> None:
    # Every read gets a byte well within read_timeout_s; only the watchdog can stop this.
    settings = LOOPBACK.model_copy(update={"timeout_s": 1.5, "read_timeout_s": 5.0})
    with SlowServer(pause_s) as slow:
        error, elapsed = _timed_fetch(f"http://127.0.0.1:{slow.port}/face.png", settings)
    assert error.kind == "image_fetch_failed" and error.retriable
    assert "took over 1.5s" in error.message
    assert 1.5 <= elapsed < 5 * 1.5  # a hang limit, not a speed figure


def test_trickled_headers_over_tls_cannot_outlast_the_total_deadline(
    certificate: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    connects: list[tuple[Any, ...]],
) -> None:
    cert, key = certificate
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr(pool.PinnedHTTPSConnection, "_tls", trusting)
    monkeypatch.setattr(socket, "getaddrinfo", Resolver(["127.0.0.1"]))
    settings = LOOPBACK.model_copy(update={"timeout_s": 1.5, "read_timeout_s": 5.0})
    with SlowServer(0.3, tls=server_tls) as slow:
        error, elapsed = _timed_fetch(f"https://images.test:{slow.port}/face.png", settings)
    assert error.kind == "image_fetch_failed" and error.retriable
    assert "took over 1.5s" in error.message
    assert 1.5 <= elapsed < 5 * 1.5  # a hang limit, not a speed figure
    assert slow.accepted == 1


def test_a_silent_server_fails_after_the_read_timeout(connects: list[tuple[Any, ...]]) -> None:
    settings = LOOPBACK.model_copy(update={"timeout_s": 5.0, "read_timeout_s": 0.4})
    with SlowServer(None) as silent:
        error, elapsed = _timed_fetch(f"http://127.0.0.1:{silent.port}/face.png", settings)
    assert error.kind == "image_fetch_failed" and error.retriable
    assert "timed out" in error.message
    assert 0.4 <= elapsed < 5 * 0.4  # well under the 5 s total deadline


def test_a_silent_tls_handshake_fails_after_the_connect_timeout(
    connects: list[tuple[Any, ...]],
) -> None:
    # The server accepts TCP but never answers the ClientHello.
    settings = LOOPBACK.model_copy(
        update={"timeout_s": 5.0, "connect_timeout_s": 0.4, "read_timeout_s": 5.0}
    )
    with SlowServer(None) as silent:
        error, elapsed = _timed_fetch(f"https://127.0.0.1:{silent.port}/face.png", settings)
    assert error.kind == "image_fetch_failed" and error.retriable
    assert 0.4 <= elapsed < 5 * 0.4  # well under the 5 s total deadline


def test_connect_timeout_holds_against_a_full_accept_queue(
    connects: list[tuple[Any, ...]],
) -> None:
    # A listener whose accept queue is full drops new SYNs: connecting hangs, like a black hole.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(4):
            filler = socket.socket()
            fillers.append(filler)
            filler.settimeout(0.2)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break  # the queue is full now
        else:
            pytest.skip("this kernel keeps accepting connections into a full queue")
        settings = LOOPBACK.model_copy(
            update={"timeout_s": 5.0, "connect_timeout_s": 0.3, "read_timeout_s": 5.0}
        )
        error, elapsed = _timed_fetch(f"http://127.0.0.1:{port}/face.png", settings)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert error.kind == "image_fetch_failed" and error.retriable
    assert 0.3 <= elapsed < 5 * 0.3  # well under the 5 s total deadline


def test_a_slow_dns_lookup_is_cut_off_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # A name server that answers slowly on purpose cannot be set up on loopback without
    # changing the machine's resolver, so getaddrinfo itself is made slow here.
    def slow(*args: Any, **kwargs: Any) -> list[Any]:
        time.sleep(3)
        return []

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    settings = FetchSettings(timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(EventError) as info:
        fetch_bytes("http://images.example/face.png", settings)
    elapsed = time.monotonic() - started
    assert info.value.kind == "image_fetch_failed" and info.value.retriable
    assert "DNS lookup" in info.value.message
    assert elapsed < 5 * 0.5  # cut off: the lookup alone takes 3 s


def test_requests_name_the_worker_and_its_version(server: tuple[str, int, list[str]]) -> None:
    """Image servers see which worker release fetched (logs, rate limits, abuse contacts)."""
    import consumer

    base, _, _ = server
    fetch_bytes(f"{base}/face.png", FetchSettings(allow_hosts=("127.0.0.1",)))
    assert _Handler.user_agents[-1] == f"emotion-worker/{consumer.__version__}"
    assert consumer.__version__ != "0+unknown"  # taken from the installed package
