"""SSRF and path traversal: what an event may make the worker connect to or read.

The autouse ``network`` fixture records every lookup and connect and fails a test that
connects anywhere but loopback; here the tests also assert the exact connections made, so
"refused" means refused before connecting, not refused after a look.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image

from consumer.config import FetchSettings
from consumer.decode.pool import ProcessDecoder
from consumer.stream.records import FailedEvent, PreparedEvent
from tests.security.conftest import (
    FETCH_BOUND_S,
    SETTINGS,
    Network,
    Peer,
    RawServer,
    encode,
    event_value,
    expect_failed,
    expect_ok,
    handle,
    response,
    run_event,
)

Serve = Callable[..., RawServer]
QUICK_S = 2.0
PNG = encode(Image.new("RGB", (8, 8), (255, 0, 0)), "PNG")

# The first hop is allowed by name only: "localhost" (the suite's DNS says 127.0.0.1).
BY_NAME = SETTINGS.model_copy(update={"allow_hosts": ("localhost",)})
NOTHING_ALLOWED = SETTINGS.model_copy(update={"allow_hosts": ()})


@pytest.fixture
def redirector(serve: Serve) -> RawServer:
    """/face.png: a PNG; /to?<url>: 302 to <url>; /loop: 302 to itself."""

    def handler(peer: Peer) -> bool:
        if peer.path.startswith("/to?"):
            location = peer.path[len("/to?") :]
        elif peer.path == "/loop":
            location = "/loop"
        else:
            return peer.send(response(PNG))
        return peer.send(response(status="302 Found", headers=(("Location", location),)))

    return serve(handler)


def test_a_redirect_to_the_allowed_name_is_followed(
    redirector: RawServer, network: Network, decoder: ProcessDecoder
) -> None:
    """The control: the first hop and a redirect to the same allowed name work."""
    port = redirector.port
    uri = f"http://localhost:{port}/to?http://localhost:{port}/face.png"
    expect_ok(run_event(uri, BY_NAME, decoder), [(8, 8)], within_s=FETCH_BOUND_S)
    assert {address for address in network.connects} == {("127.0.0.1", port)}


REDIRECTS = [
    "http://127.0.0.1:{port}/face.png",  # the same server, by address: not the allowed name
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://[::ffff:127.0.0.1]:{port}/face.png",
    "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
    "http://[::1]:{port}/face.png",
    "http://0:{port}/face.png",
    "http://2130706433:{port}/face.png",
    "http://2852039166/latest/meta-data/",  # 169.254.169.254 in decimal
    "http://0x7f.1:{port}/face.png",
    "//169.254.169.254/latest/meta-data/",  # scheme-relative
    "http://localhost@169.254.169.254/latest/meta-data/",
    "http://localhost:{port}@127.0.0.1:{port}/face.png",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://private.test/admin",
    "http://mixed.test/face.png",  # one public and one metadata address
    "file:///etc/passwd",
    "gopher://localhost:{port}/_GET%20/",
    "ftp://localhost:{port}/face.png",
    "http://localhost:99999/face.png",  # a malformed port
]


@pytest.mark.parametrize("location", REDIRECTS)
def test_redirects_to_forbidden_targets_are_refused_before_connecting(
    location: str, redirector: RawServer, network: Network, decoder: ProcessDecoder
) -> None:
    port = redirector.port
    uri = f"http://localhost:{port}/to?{location.format(port=port)}"
    failed = expect_failed(
        run_event(uri, BY_NAME, decoder), "image_fetch_refused", within_s=QUICK_S
    )
    assert network.connects == [("127.0.0.1", port)]  # the first hop, nothing else
    assert failed.fetch_attempts == 1  # permanent: never retried
    assert redirector.requests and all(b"/to?" in head for head in redirector.requests)


def test_a_redirect_loop_stops_at_max_redirects(
    redirector: RawServer, decoder: ProcessDecoder
) -> None:
    uri = f"http://localhost:{redirector.port}/loop"
    failed = expect_failed(run_event(uri, BY_NAME, decoder), "image_fetch_failed", within_s=QUICK_S)
    assert "max_redirects=3" in failed.message
    assert len(redirector.requests) == 4


NUMERIC_AND_INTERNAL = [
    "http://2130706433/x.png",  # 127.0.0.1, decimal
    "http://0177.0.0.1/x.png",  # octal
    "http://0x7f.0.0.1/x.png",  # hex
    "http://0x7f000001/x.png",
    "http://017700000001/x.png",
    "http://127.1/x.png",
    "http://127.000.000.001/x.png",
    "http://0/x.png",
    "http://0.0.0.0/x.png",
    "http://[::]/x.png",
    "http://[::1]/x.png",
    "http://[::ffff:7f00:1]/x.png",
    "http://[0:0:0:0:0:ffff:127.0.0.1]/x.png",
    "http://[::ffff:169.254.169.254]/latest/meta-data/",
    "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/",  # NAT64 of the metadata address
    "http://[2002:a9fe:a9fe::1]/latest/meta-data/",  # 6to4 of it
    "http://169.254.169.254/latest/meta-data/",
    "http://2852039166/latest/meta-data/",
    "http://[fd00:ec2::254]/latest/meta-data/",  # AWS's IPv6 metadata address
    "http://100.100.100.200/latest/meta-data/",  # Alibaba's, in CGNAT space
    "http://10.0.0.5/x.png",
    "http://192.168.1.1:8080/x.png",
    "http://224.0.0.1/x.png",
    "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/x.png",  # fullwidth digits
    "http://\u2460\u2461\u2466.\u24ea.\u24ea.\u2460/x.png",  # circled digits
    "http://localhost/x.png",
    "http://LOCALHOST./x.png",
    "http://metadata.google.internal/computeMetadata/v1/",
    "https://rebind.test/x.png",
]


@pytest.mark.parametrize("uri", NUMERIC_AND_INTERNAL)
def test_internal_addresses_in_any_spelling_are_refused(
    uri: str, network: Network, decoder: ProcessDecoder
) -> None:
    run = run_event(uri, NOTHING_ALLOWED, decoder)
    expect_failed(run, "image_fetch_refused", "invalid_event", within_s=QUICK_S)
    assert network.connects == []


@pytest.mark.parametrize(
    "uri",
    [
        "http://good.example@evil.example/x.png",
        "http://user:pass@images.example/x.png",
        "https://user:@images.example/x.png",
        "http://images.example\\@127.0.0.1/x.png",
        "http://localhost:80@169.254.169.254/",
        "http://%40@127.0.0.1/x.png",
        "http://a:b@[::1]/x.png",
    ],
)
def test_userinfo_is_refused_before_any_lookup(
    uri: str, network: Network, decoder: ProcessDecoder
) -> None:
    settings = SETTINGS.model_copy(update={"allow_hosts": ("127.0.0.1", "localhost", "::1")})
    run = run_event(uri, settings, decoder)
    failed = expect_failed(run, "image_fetch_refused", "invalid_event", within_s=QUICK_S)
    if failed.kind == "image_fetch_refused":
        assert "user info" in failed.message
    assert network.lookups == [] and network.connects == []


# ---- file:// -----------------------------------------------------------------------------


def file_uri(path: str) -> str:
    return "file://" + quote(path)


@pytest.fixture
def tree(roots: tuple[Path, FetchSettings]) -> tuple[Path, Path, FetchSettings]:
    """roots' folder with an image inside; a secret, a folder and a sibling outside it."""
    root, settings = roots
    (root / "in.png").write_bytes(PNG)
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(PNG)
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "linked-dir").symlink_to(outside)
    sibling = root.parent / (root.name + "x")  # shares the root's name as a prefix
    sibling.mkdir()
    (sibling / "in.png").write_bytes(PNG)
    return root, outside, settings


def test_a_file_inside_the_roots_is_read(
    tree: tuple[Path, Path, FetchSettings], decoder: ProcessDecoder
) -> None:
    root, _, settings = tree
    run = run_event(file_uri(f"{root}/in.png"), settings, decoder)
    expect_ok(run, [(8, 8)], within_s=QUICK_S)
    run = run_event(file_uri(f"{root}/linked-dir/../in.png"), settings, decoder)
    expect_failed(run, "image_fetch_refused", within_s=QUICK_S)  # .. after a link: outside


@pytest.mark.parametrize(
    "template",
    [
        "{root}/../outside/secret.png",
        "{root}/%2e%2e/outside/secret.png",
        "{root}/%2E%2E%2Foutside%2Fsecret.png",
        "{root}/link.png",
        "{root}/linked-dir/secret.png",
        "{root}x/in.png",
        "/etc/passwd",
        "/proc/self/environ",
        "//localhost/etc/passwd",
        "/dev/zero",
    ],
)
def test_files_outside_the_roots_are_refused(
    template: str, tree: tuple[Path, Path, FetchSettings], decoder: ProcessDecoder
) -> None:
    root, _, settings = tree
    path = template.format(root=root)
    # %-escapes in the template stay escapes; the rest is quoted like any path.
    uri = "file:" + path if path.startswith("//") else "file://" + quote(path, safe="/%")
    run = run_event(uri, settings, decoder)
    failed = expect_failed(run, "image_fetch_refused", within_s=QUICK_S)
    assert "fetch.file_roots" in failed.message


@pytest.mark.parametrize("path", ["{root}/in.png", "/etc/passwd", "/proc/self/environ"])
def test_without_file_roots_every_file_is_refused(
    path: str, tree: tuple[Path, Path, FetchSettings], decoder: ProcessDecoder
) -> None:
    root, _, _ = tree
    assert SETTINGS.file_roots == ()  # the default
    run = run_event(file_uri(path.format(root=root)), SETTINGS, decoder)
    failed = expect_failed(run, "image_fetch_refused", within_s=QUICK_S)
    assert "fetch.file_roots is empty" in failed.message


FIFO_BUG = (
    "consumer/fetch/local.py read_file: a FIFO (or any non-regular file) inside fetch.file_roots "
    "blocks path.open('rb') forever: no timeout applies to file:// reads, so each such event "
    "takes a fetch thread for good and fetch.threads of them stop the worker (and the "
    "partition's in-order output). With file_roots unset (then: any path) any FIFO or "
    "/proc/self/fd/N pipe on the host works. Fix: os.open(path, O_RDONLY | O_NONBLOCK), "
    "fstat, and refuse anything but S_ISREG (image_not_found or image_fetch_refused) "
    "before reading."
)


def test_a_fifo_inside_the_roots_does_not_hang_the_fetch(
    roots: tuple[Path, FetchSettings], decoder: ProcessDecoder
) -> None:
    root, settings = roots
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    outcome: list[FailedEvent | PreparedEvent] = []
    worker = threading.Thread(
        target=lambda: outcome.append(handle(event_value(fifo.as_uri()), settings, decoder)),
        daemon=True,
    )
    worker.start()
    worker.join(FETCH_BOUND_S)
    hung = worker.is_alive()
    if hung:  # unblock the reader: open the write end and close it (EOF)
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
    assert not worker.is_alive()
    assert not hung, f"the file:// fetch of a FIFO was still blocked after {FETCH_BOUND_S}s"
    assert isinstance(outcome[0], FailedEvent)


OS_ERROR_BUG = (
    "consumer/fetch/local.py read_file catches only FileNotFoundError, IsADirectoryError and "
    "PermissionError: a path with a NUL byte (%00: ValueError, raised by os.path.realpath "
    "before the roots check), a file used as a folder (NotADirectoryError), a symlink loop "
    "(ELOOP) or an over-long name (ENAMETOOLONG) escapes to prepare_event's catch-all and "
    "is dead-lettered as image_undecodable ('ValueError: embedded null byte', ...), which "
    "blames the image. Fix: map ValueError to image_fetch_refused/invalid_event and any "
    "other OSError to image_not_found (or retriable image_fetch_failed for EIO)."
)


@pytest.mark.parametrize(
    "name",
    ["a%00b.png", "in.png/x.png", "loop-a", "n" * 300 + ".png"],
    ids=["nul", "enotdir", "eloop", "enametoolong"],
)
def test_unreadable_paths_are_not_blamed_on_the_image(
    name: str, roots: tuple[Path, FetchSettings], decoder: ProcessDecoder
) -> None:
    root, settings = roots
    (root / "in.png").write_bytes(PNG)
    (root / "loop-a").symlink_to(root / "loop-b")
    (root / "loop-b").symlink_to(root / "loop-a")
    run = run_event(f"file://{quote(str(root))}/{name}", settings, decoder)
    expect_failed(run, "image_not_found", "image_fetch_refused", "invalid_event", within_s=QUICK_S)


def test_a_folder_inside_the_roots_is_not_found(
    roots: tuple[Path, FetchSettings], decoder: ProcessDecoder
) -> None:
    root, settings = roots
    run = run_event(root.as_uri(), settings, decoder)
    expect_failed(run, "image_not_found", within_s=QUICK_S)
