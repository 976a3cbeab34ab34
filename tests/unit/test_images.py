"""Fetching (file and real loopback HTTP) and decoding into RGB, with caps and error kinds."""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from consumer.config import FetchSettings
from consumer.decode.images import decode_image
from consumer.errors import EventError
from consumer.fetch.references import fetch_bytes, fetch_with_retries
from tests.support.http_server import ImageServer

# The test servers listen on loopback, which the SSRF guard refuses unless allowed.
LOOPBACK = ("127.0.0.1",)


def png_bytes(mode: str, size: tuple[int, int] = (20, 10)) -> bytes:
    image = Image.new(mode, size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
def test_every_mode_decodes_to_rgb(mode: str) -> None:
    image = decode_image(png_bytes(mode), max_pixels=10_000)
    assert image.mode == "RGB"
    assert image.size == (20, 10)


def test_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert decode_image(buffer.getvalue(), 100).getpixel((0, 0)) == (255, 255, 255)


def test_real_fer_face_decodes(fer_faces: list[tuple[Path, str]]) -> None:
    path, _ = fer_faces[0]
    image = decode_image(path.read_bytes(), 10_000)
    assert image.mode == "RGB" and image.size == (48, 48)


@pytest.mark.parametrize("data", [b"", b"hello", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50])
def test_garbage_is_undecodable(data: bytes) -> None:
    with pytest.raises(EventError) as info:
        decode_image(data, 10_000)
    assert info.value.kind == "image_undecodable"


def test_format_outside_allowlist_is_refused() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="TIFF")
    with pytest.raises(EventError) as info:
        decode_image(buffer.getvalue(), 10_000)
    assert info.value.kind == "image_undecodable"


def test_pixel_cap_is_an_error_before_decoding() -> None:
    with pytest.raises(EventError) as info:
        decode_image(png_bytes("L", (200, 200)), max_pixels=10_000)
    assert info.value.kind == "image_too_large" and "200x200" in info.value.message


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (30, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), 10_000).size == (10, 30)


def test_file_fetch_and_errors(tmp_path: Path) -> None:
    settings = FetchSettings(max_bytes=1024, file_roots=(tmp_path,))
    small = tmp_path / "a b.png"
    small.write_bytes(b"x" * 100)
    assert fetch_bytes(small.as_uri(), settings) == b"x" * 100  # %20 in the URI is unquoted
    with pytest.raises(EventError) as missing:
        fetch_bytes((tmp_path / "nope.png").as_uri(), settings)
    assert missing.value.kind == "image_not_found"
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(EventError) as too_big:
        fetch_bytes(big.as_uri(), settings)
    assert too_big.value.kind == "image_too_large"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ImageServer]:
    (tmp_path / "face.png").write_bytes(png_bytes("L"))
    with ImageServer(tmp_path) as server:
        yield server


def test_http_fetch(served: ImageServer) -> None:
    data = fetch_bytes(f"{served.url}/face.png", FetchSettings(allow_hosts=LOOPBACK))
    assert decode_image(data, 10_000).size == (20, 10)


def test_http_404_is_permanent(served: ImageServer) -> None:
    settings = FetchSettings(retries=3, retry_backoff_s=0, allow_hosts=LOOPBACK)
    with pytest.raises(EventError) as info:
        fetch_with_retries(f"{served.url}/missing.png", settings)
    assert info.value.kind == "image_not_found" and not info.value.retriable
    assert served.requests == 1  # never retried


def test_http_5xx_is_retried_then_reported(served: ImageServer) -> None:
    settings = FetchSettings(retries=2, retry_backoff_s=0, allow_hosts=LOOPBACK)
    with pytest.raises(EventError) as info:
        fetch_with_retries(f"{served.url}/status/503", settings)
    assert info.value.kind == "image_fetch_failed"
    assert "after 3 attempt(s)" in info.value.message
    assert info.value.attempts == 3
    assert served.requests == 3


class _Endless(BaseHTTPRequestHandler):
    """Streams 64 MiB with no Content-Length: the cap must hold while reading."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        try:
            for _ in range(1024):
                self.wfile.write(b"x" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        pass


def test_http_size_cap_is_enforced_while_streaming() -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/x"
        with pytest.raises(EventError) as info:
            fetch_bytes(url, FetchSettings(max_bytes=1024 * 1024, allow_hosts=LOOPBACK))
        assert info.value.kind == "image_too_large"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_connection_refused_is_retriable() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(EventError) as info:
        fetch_bytes(
            f"http://127.0.0.1:{port}/x.png", FetchSettings(timeout_s=2, allow_hosts=LOOPBACK)
        )
    assert info.value.kind == "image_fetch_failed" and info.value.retriable


def test_pillow_bomb_guard_is_image_too_large() -> None:
    from tests.faults.test_poison import bomb_png

    with pytest.raises(EventError) as info:
        decode_image(bomb_png(), max_pixels=10**12)  # our cap is off; Pillow's fires
    assert info.value.kind == "image_too_large"


def _tiff() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "the file is empty (0 bytes)"),
        (bytes(range(200, 256)), "format not recognised (56 bytes, starting c8 c9 ca"),
        (b"hello", "it is plain text, not an accepted image format (JPEG, PNG"),
        (b"<html><body>Not Found</body></html>", "it is HTML/XML text, not an accepted"),
        (_tiff(), "it is TIFF, not an accepted image format"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "starts like a PNG file but its header is broken"),
        (png_bytes("RGB", (40, 40))[:60], "the PNG 40x40 image data is truncated"),
    ],
)
def test_undecodable_messages_say_what_is_wrong(data: bytes, words: str) -> None:
    with pytest.raises(EventError) as info:
        decode_image(data, 10_000)
    assert info.value.kind == "image_undecodable"
    assert info.value.message.startswith("image cannot be decoded: ")
    assert words in info.value.message, info.value.message
    assert not re.search(r"at 0x[0-9a-fA-F]+|BytesIO", info.value.message)
