"""Hostile HTTP servers (scripted, on 127.0.0.1): slow, silent, endless, lying and malformed.

Time bounds follow from the settings in conftest: fetch.timeout_s = 2 s bounds a whole
fetch, fetch.read_timeout_s = 1 s any one silence; upper bounds are hang limits of
HANG_FACTOR (5) times them.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

import pytest
from PIL import Image

from consumer.decode.pool import ProcessDecoder
from consumer.stream.records import PreparedEvent
from tests.security.conftest import (
    FETCH_BOUND_S,
    HANG_FACTOR,
    MAX_BYTES,
    READ_TIMEOUT_S,
    SETTINGS,
    TIMEOUT_S,
    Handler,
    Peer,
    RawServer,
    encode,
    expect_failed,
    expect_ok,
    gzip_bomb,
    response,
    run_event,
)

Serve = Callable[..., RawServer]
PNG_TYPE = (("Content-Type", "image/png"),)
# Buffering max_bytes (4 MiB) is the honest price of a fetch; an unbounded one is GBs.
FETCH_MEMORY_MB = 64.0
SILENCE_BOUND_S = HANG_FACTOR * READ_TIMEOUT_S


def png(colour: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (8, 8)) -> bytes:
    return encode(Image.new("RGB", size, colour), "PNG")


def answer(data: bytes, *, keep: bool = False) -> Handler:
    def handler(peer: Peer) -> bool:
        return peer.send(data) and keep

    return handler


def accept_encodings(server: RawServer) -> list[str]:
    found = []
    for head in server.requests:
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"accept-encoding":
                found.append(value.strip().decode())
    return found


# ---- content that is not what it says ----------------------------------------------------

NOT_IMAGES = {
    "html": b"<!doctype html><html><body><h1>Login</h1></body></html>",
    "svg-xxe": (
        b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><text>&x;</text></svg>'
    ),
    "pdf": b"%PDF-1.7\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF",
    "json": b'{"error": "not found"}',
    "png-magic-then-html": b"\x89PNG\r\n\x1a\n<html></html>",
}


@pytest.mark.parametrize("name", list(NOT_IMAGES))
def test_non_images_served_as_image_png_are_undecodable(
    name: str, serve: Serve, decoder: ProcessDecoder
) -> None:
    server = serve(answer(response(NOT_IMAGES[name], headers=PNG_TYPE)))
    run = run_event(f"{server.url}/face.png", SETTINGS, decoder)
    expect_failed(run, "image_undecodable", within_s=FETCH_BOUND_S, memory_mb=FETCH_MEMORY_MB)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """1 GiB of zeros, gzip-compressed to about 1 MB."""
    return gzip_bomb(1 << 30)


def test_a_gzip_body_is_never_expanded(bomb: bytes, serve: Serve, decoder: ProcessDecoder) -> None:
    assert len(bomb) < MAX_BYTES  # so the body itself passes the byte cap
    headers = (*PNG_TYPE, ("Content-Encoding", "gzip"))
    server = serve(answer(response(bomb, headers=headers)))
    run = run_event(f"{server.url}/face.png", SETTINGS, decoder)
    # Expanded, it would be 1 GiB in this process (or image_too_large at max_bytes).
    expect_failed(run, "image_undecodable", within_s=FETCH_BOUND_S, memory_mb=FETCH_MEMORY_MB)
    assert accept_encodings(server) in ([], ["identity"])  # we never asked for gzip


# ---- slow and silent servers -------------------------------------------------------------


def trickle_body(peer: Peer) -> None:
    if peer.send(response(headers=PNG_TYPE, length=100_000)):
        peer.trickle(png() * 1000, every_s=0.25)


def trickle_headers(peer: Peer) -> None:
    if peer.send(b"HTTP/1.1 200 OK\r\n"):
        peer.trickle(b"X-Slow: " + b"a" * 10_000 + b"\r\n\r\n", every_s=0.25)


@pytest.mark.parametrize("handler", [trickle_body, trickle_headers], ids=["body", "headers"])
def test_a_server_trickling_bytes_is_cut_off_at_timeout_s(
    handler: Handler, serve: Serve, decoder: ProcessDecoder
) -> None:
    """Each byte comes well within read_timeout_s; only the total deadline can stop it."""
    server = serve(handler)
    run = run_event(f"{server.url}/face.png", SETTINGS, decoder)
    failed = expect_failed(run, "image_fetch_failed", within_s=FETCH_BOUND_S)
    assert run.elapsed_s >= TIMEOUT_S * 0.9  # it was the deadline, not a read timeout
    assert f"took over {TIMEOUT_S}s" in failed.message


def silent(peer: Peer) -> None:
    peer.hold()


def silent_after_headers(peer: Peer) -> None:
    if peer.send(response(headers=PNG_TYPE, length=1000)):
        peer.hold()


def silent_mid_body(peer: Peer) -> None:
    if peer.send(response(png(), headers=PNG_TYPE, length=10**12)[:-20]):
        peer.hold()


@pytest.mark.parametrize(
    "handler",
    [silent, silent_after_headers, silent_mid_body],
    ids=["at-once", "after-head", "mid-body"],
)
def test_a_server_that_goes_silent_fails_at_read_timeout_s(
    handler: Handler, serve: Serve, decoder: ProcessDecoder
) -> None:
    server = serve(handler)
    run = run_event(f"{server.url}/face.png", SETTINGS, decoder)
    expect_failed(run, "image_fetch_failed", within_s=SILENCE_BOUND_S)
    assert run.elapsed_s >= READ_TIMEOUT_S * 0.9


def test_retries_multiply_only_the_silence(serve: Serve, decoder: ProcessDecoder) -> None:
    server = serve(silent)
    settings = SETTINGS.model_copy(update={"retries": 2, "read_timeout_s": 0.5})
    run = run_event(f"{server.url}/face.png", settings, decoder)
    failed = expect_failed(run, "image_fetch_failed", within_s=HANG_FACTOR * 3 * 0.5)
    assert failed.fetch_attempts == 3 and server.connections == 3


# ---- endless and lying bodies ------------------------------------------------------------

CHUNK = b"\x00" * 65536


def endless_chunked(peer: Peer) -> None:
    if peer.send(response(headers=(*PNG_TYPE, ("Transfer-Encoding", "chunked")), length=None)):
        frame = b"%x\r\n" % len(CHUNK) + CHUNK + b"\r\n"
        while peer.send(frame):
            pass


def endless_unsized(peer: Peer) -> None:
    if peer.send(response(headers=(*PNG_TYPE, ("Connection", "close")), length=None)):
        while peer.send(CHUNK):
            pass


def endless_claiming_huge(peer: Peer) -> None:
    if peer.send(response(headers=PNG_TYPE, length=10**15)):
        while peer.send(CHUNK):
            pass


def endless_huge_chunk(peer: Peer) -> None:
    headers = (*PNG_TYPE, ("Transfer-Encoding", "chunked"))
    if peer.send(response(headers=headers, length=None) + b"ffffffffffffffff\r\n"):
        while peer.send(CHUNK):
            pass


@pytest.mark.parametrize(
    "handler",
    [endless_chunked, endless_unsized, endless_claiming_huge, endless_huge_chunk],
    ids=["chunked", "unsized", "content-length-1e15", "one-16-exabyte-chunk"],
)
def test_an_endless_body_stops_at_max_bytes(
    handler: Handler, serve: Serve, decoder: ProcessDecoder
) -> None:
    server = serve(handler)
    run = run_event(f"{server.url}/face.png", SETTINGS, decoder)
    failed = expect_failed(
        run, "image_too_large", within_s=FETCH_BOUND_S, memory_mb=FETCH_MEMORY_MB
    )
    assert f"over {MAX_BYTES} bytes" in failed.message


def test_a_content_length_smaller_than_the_body_caps_what_is_read(
    serve: Serve, decoder: ProcessDecoder
) -> None:
    """Content-Length says 100, 64 MiB follow: only 100 bytes are read (a cut PNG)."""
    noisy = encode(Image.effect_noise((64, 64), 64).convert("RGB"), "PNG")
    assert len(noisy) > 1000

    def lying(peer: Peer) -> None:
        if peer.send(response(noisy, headers=PNG_TYPE, length=100)):
            for _ in range(1024):
                if not peer.send(CHUNK):
                    return

    server = serve(lying)
    run = run_event(f"{server.url}/face.png", SETTINGS, decoder)
    expect_failed(run, "image_undecodable", within_s=FETCH_BOUND_S, memory_mb=FETCH_MEMORY_MB)


def test_a_content_length_larger_than_the_body_then_close_fails(
    serve: Serve, decoder: ProcessDecoder
) -> None:
    server = serve(answer(response(png(), headers=PNG_TYPE, length=10**12)))
    run = run_event(f"{server.url}/face.png", SETTINGS, decoder)
    failed = expect_failed(run, "image_fetch_failed", within_s=FETCH_BOUND_S)
    assert "closed mid-body" in failed.message


def test_a_smuggled_second_response_is_never_served(serve: Serve, decoder: ProcessDecoder) -> None:
    """/a answers a red PNG and, on the same connection, an unasked-for green one; /b (blue)
    must get its own answer, not the smuggled response left on a pooled connection."""
    red, green, blue = png((255, 0, 0)), png((0, 255, 0)), png((0, 0, 255))

    def handler(peer: Peer) -> bool:
        if peer.path == "/a":
            return peer.send(response(red) + response(green))
        return peer.send(response(blue))

    server = serve(handler)
    first = expect_ok(
        run_event(f"{server.url}/a", SETTINGS, decoder), [(8, 8)], within_s=FETCH_BOUND_S
    )
    assert first.crops[0].getpixel((0, 0)) == (255, 0, 0)
    second = expect_ok(
        run_event(f"{server.url}/b", SETTINGS, decoder), [(8, 8)], within_s=FETCH_BOUND_S
    )
    assert second.crops[0].getpixel((0, 0)) == (0, 0, 255)


# ---- malformed responses -----------------------------------------------------------------


def endless_headers(peer: Peer) -> None:
    if peer.send(b"HTTP/1.1 200 OK\r\n"):
        index = 0
        while peer.send(b"X-%d: %s\r\n" % (index, b"v" * 1000)):
            index += 1


def endless_continue(peer: Peer) -> None:
    while peer.send(b"HTTP/1.1 100 Continue\r\nX: y\r\n\r\n"):
        pass


def reset(peer: Peer) -> None:
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.sock.close()  # an RST instead of a FIN


MALFORMED: dict[str, Handler] = {
    "101-headers": answer(
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n"
    ),
    "header-line-over-64k": answer(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000 + b"\r\n\r\n"),
    "endless-headers": endless_headers,
    "endless-100-continue": endless_continue,
    "status-line-over-64k": answer(b"HTTP/1.1 200 " + b"O" * 70_000 + b"\r\n\r\n"),
    "bad-status-code": answer(b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n"),
    "http-0.9-no-status-line": answer(png()),
    "bad-chunk-size": answer(
        response(headers=(("Transfer-Encoding", "chunked"),), length=None) + b"zz\r\n"
    ),
    "chunk-size-line-over-64k": answer(
        response(headers=(("Transfer-Encoding", "chunked"),), length=None) + b"1" * 70_000
    ),
    "closed-without-answer": lambda peer: None,
    "reset": reset,
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_responses_fail_the_fetch_quickly(
    name: str, serve: Serve, decoder: ProcessDecoder
) -> None:
    server = serve(MALFORMED[name])
    run = run_event(f"{server.url}/face.png", SETTINGS, decoder)
    expect_failed(run, "image_fetch_failed", within_s=FETCH_BOUND_S, memory_mb=FETCH_MEMORY_MB)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nContent-Length: 999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\nConnection: close\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 10\r\n\r\n-1\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n",
    ],
    ids=["two-lengths", "negative-length", "chunked-and-length-negative-chunk", "te-gzip"],
)
def test_ambiguous_framing_ends_quickly_whatever_it_decides(
    head: bytes, serve: Serve, decoder: ProcessDecoder
) -> None:
    """Conflicting or invalid framing headers: a dead letter or the image the bytes hold
    (four PNGs in a row decode as the first), but never a hang or unbounded reading."""
    server = serve(answer(head + png() * 4))
    run = run_event(f"{server.url}/face.png", SETTINGS, decoder)
    if isinstance(run.outcome, PreparedEvent):
        expect_ok(run, [(8, 8)], within_s=FETCH_BOUND_S, memory_mb=FETCH_MEMORY_MB)
    else:
        expect_failed(
            run,
            "image_fetch_failed",
            "image_undecodable",
            within_s=FETCH_BOUND_S,
            memory_mb=FETCH_MEMORY_MB,
        )
