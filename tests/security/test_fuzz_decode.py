"""Mutation fuzzing of the decoders with small valid PNG, JPEG, GIF, BMP and WebP files.

Deterministic (derandomize=True, no example database) so CI runs the same inputs every
time. Property: the decoder returns crops (RGB, one per box, box-sized) or raises an
EventError of kind image_undecodable / image_too_large; nothing else escapes; the decoder
process survives and agrees with the in-process decoder.
"""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from consumer.config import FaceSettings
from consumer.decode.decoding import Cropped
from consumer.decode.pool import InlineDecoder, ProcessDecoder
from consumer.errors import EventError
from tests.security.conftest import (
    DECODE_KINDS,
    DECODE_TIMEOUT_S,
    HANG_FACTOR,
    MAX_PIXELS,
    encode,
)


def _gradient(size: tuple[int, int]) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size)
    image.putdata(
        [
            (x * 16 % 256, y * 16 % 256, (x + y) * 8 % 256)
            for y in range(height)
            for x in range(width)
        ]
    )
    return image


def _seeds() -> dict[str, bytes]:
    picture = _gradient((12, 10))
    frames = [picture.convert("P"), picture.rotate(90).convert("P")]
    return {
        "png": encode(picture, "PNG"),
        "png-palette": encode(picture.convert("P"), "PNG", transparency=0),
        "png-interlaced": encode(picture.convert("LA"), "PNG", interlace=1),
        "jpeg": encode(picture, "JPEG", quality=80),
        "jpeg-progressive": encode(picture, "JPEG", progressive=True, exif=Image.Exif()),
        "gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0),
        "bmp": encode(picture, "BMP"),
        "bmp-1bit": encode(picture.convert("1"), "BMP"),
        "webp-lossy": encode(picture, "WEBP", quality=50),
        "webp-lossless": encode(picture.convert("RGBA"), "WEBP", lossless=True),
    }


SEEDS = _seeds()
NAMES = sorted(SEEDS)
OPS = ["flip", "set", "truncate", "splice", "insert", "delete", "stamp", "size"]


def _size_fields(data: bytes) -> list[tuple[int, str]]:
    """Where a seed keeps its width and height: (offset, struct format) of each."""
    if data.startswith(b"\x89PNG"):
        return [(16, ">I"), (20, ">I")]
    if data.startswith(b"GIF"):
        return [(6, "<H"), (8, "<H")]
    if data.startswith(b"BM"):
        return [(18, "<i"), (22, "<i")]
    if data.startswith(b"\xff\xd8"):
        sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
        return [(sof + 5, ">H"), (sof + 7, ">H")]
    if data[12:16] == b"VP8 ":
        return [(26, "<H"), (28, "<H")]
    return []


SIZE_FIELDS = {name: _size_fields(data) for name, data in SEEDS.items()}
INLINE = InlineDecoder(FaceSettings(), MAX_PIXELS)
EXAMPLE_BOUND_S = HANG_FACTOR * DECODE_TIMEOUT_S


@st.composite
def mutants(draw: st.DrawFn) -> bytes:
    """A seed file with one to four mutations."""
    name = draw(st.sampled_from(NAMES))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(OPS))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80]) | st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":  # a slice of another seed over this one (chunks, markers)
            other = SEEDS[draw(st.sampled_from(NAMES))]
            start = draw(st.integers(0, len(other) - 1))
            length = draw(st.integers(1, 64))
            data[pos : pos + length] = other[start : start + length]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=32))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 32))]
        elif op == "stamp":  # sizes, lengths and offsets: big, small, negative
            value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF]))
            fmt = draw(st.sampled_from([">I", "<I", ">H", "<H"]))
            packed = struct.pack(fmt, value & (0xFFFF if fmt.endswith("H") else 0xFFFFFFFF))
            data[pos : pos + len(packed)] = packed
        elif op == "size":  # a declared width and height, each from 0 to 70000 or huge
            for offset, fmt in SIZE_FIELDS[name]:
                value = draw(st.integers(1, 70_000) | st.sampled_from([0, 65_535, 2**31 - 1]))
                packed = struct.pack(fmt, value & (0xFFFF if fmt.endswith("H") else 0x7FFFFFFF))
                data[offset : offset + len(packed)] = packed
    return bytes(data)


def outcome(decode: InlineDecoder | ProcessDecoder, data: bytes) -> Cropped | str:
    """The decoder's crops, or the kind of its EventError; anything else fails the test."""
    started = time.monotonic()
    try:
        cropped = decode.decode(data, None)
    except EventError as exc:
        assert exc.kind in DECODE_KINDS, f"{exc.kind}: {exc.message}"
        return exc.kind
    finally:
        assert time.monotonic() - started < EXAMPLE_BOUND_S
    assert len(cropped.boxes) == len(cropped.crops) == 1  # no detector: the whole image
    crop, box = cropped.crops[0], cropped.boxes[0]
    assert crop.mode == "RGB" and crop.size == (box.width, box.height)
    assert box.width * box.height <= MAX_PIXELS
    return cropped


def test_every_seed_decodes() -> None:
    for name in NAMES:
        assert isinstance(outcome(INLINE, SEEDS[name]), Cropped), name


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(mutants())
def test_fuzz_inline_decoder(data: bytes) -> None:
    outcome(INLINE, data)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=mutants())
def test_fuzz_process_decoder_agrees_and_survives(data: bytes, decoder: ProcessDecoder) -> None:
    remote = outcome(decoder, data)
    local = outcome(INLINE, data)
    if isinstance(local, Cropped):
        assert isinstance(remote, Cropped), f"inline gave crops, the process {remote}"
        assert remote.boxes == local.boxes
        assert remote.crops[0].tobytes() == local.crops[0].tobytes()
    else:
        assert remote == local
    assert isinstance(outcome(decoder, SEEDS["png"]), Cropped)  # it still works
