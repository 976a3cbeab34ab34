"""Hostile image files (file:// under fetch.file_roots) through parse, fetch, decode and crop.

Decoding runs in the session's decoder process, as in the worker; the memory bounds are
those of this (the worker's) process, which must never see a bomb's pixels.
"""

from __future__ import annotations

import io
import random
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from consumer.config import FetchSettings
from consumer.decode.pool import ProcessDecoder
from consumer.stream.records import PreparedEvent
from tests.security import conftest as security_conftest
from tests.security.conftest import (
    DECODE_TIMEOUT_S,
    HANG_FACTOR,
    MAX_BYTES,
    MEMORY_BOUND_MB,
    encode,
    expect_failed,
    expect_ok,
    face_box,
    gif_with_frames,
    make_process_decoder,
    png_chunk,
    raw_png,
    run_event,
)

DECODE_BOUND_S = HANG_FACTOR * DECODE_TIMEOUT_S
QUICK_S = 3.0  # refusing by the header, or decoding a tiny image, is quick


def put(root: Path, name: str, data: bytes) -> str:
    path = root / name
    path.write_bytes(data)
    return path.as_uri()


def noise(size: tuple[int, int], seed: int = 1) -> Image.Image:
    """Incompressible pixels, so that a cut always lands in the pixel data."""
    rng = random.Random(seed)
    return Image.frombytes("RGB", size, rng.randbytes(size[0] * size[1] * 3))


# ---- empty and truncated -----------------------------------------------------------------


def _truncated() -> dict[str, bytes]:
    png = encode(noise((64, 64)), "PNG")
    jpeg = encode(noise((64, 64)), "JPEG", quality=90)
    gif = encode(noise((64, 64)).convert("P"), "GIF")
    return {
        "empty": b"",
        "png-half": png[: len(png) // 2],
        "png-signature-only": png[:8],
        "png-header-only": png[:33],
        "jpeg-half": jpeg[: len(jpeg) // 2],
        "jpeg-soi-only": jpeg[:2],
        "gif-half": gif[: len(gif) // 2],
        "bmp-half": encode(noise((64, 64)), "BMP")[:6000],
    }


TRUNCATED = _truncated()


@pytest.mark.parametrize("name", list(TRUNCATED))
def test_empty_and_truncated_files_are_undecodable(
    name: str, roots: tuple[Path, FetchSettings], decoder: ProcessDecoder
) -> None:
    root, settings = roots
    run = run_event(put(root, name, TRUNCATED[name]), settings, decoder)
    expect_failed(run, "image_undecodable", within_s=QUICK_S)


# ---- decompression bombs -----------------------------------------------------------------


def png_header_bomb() -> bytes:
    """A ~100-byte PNG whose header claims 100000x100000 8-bit grey pixels."""
    return raw_png(100_000, 100_000, zlib.compress(b"\x00" * 1000))


def png_real_bomb() -> bytes:
    """A complete, valid 20000x20000 1-bit palette PNG: 400 M pixels in about 60 KB."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 20_000 // 8)  # filter byte + 2500 bytes of 8 pixels each
    idat = b"".join(compressor.compress(row) for _ in range(20_000)) + compressor.flush()
    return raw_png(
        20_000, 20_000, idat, bit_depth=1, colour_type=3, plte=b"\xff\x00\x00\x00\x00\xff"
    )


def jpeg_header_bomb() -> bytes:
    data = bytearray(encode(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65_500, 65_500)  # height, width
    return bytes(data)


def gif_screen_bomb() -> bytes:
    data = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", 65_535, 65_535)  # the logical screen
    return bytes(data)


def bmp_header_bomb() -> bytes:
    data = bytearray(encode(Image.new("RGB", (8, 8)), "BMP"))
    data[18:26] = struct.pack("<ii", 100_000, 100_000)
    return bytes(data)


BOMBS = {
    "png-header-100000x100000": png_header_bomb,
    "png-real-20000x20000-1bit": png_real_bomb,
    "jpeg-65500x65500": jpeg_header_bomb,
    "gif-screen-65535x65535": gif_screen_bomb,
    "bmp-100000x100000": bmp_header_bomb,
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_decompression_bombs_are_too_large(
    name: str, roots: tuple[Path, FetchSettings], decoder: ProcessDecoder
) -> None:
    root, settings = roots
    data = BOMBS[name]()
    assert len(data) < 100_000
    run = run_event(put(root, name, data), settings, decoder)
    failed = expect_failed(run, "image_too_large", within_s=QUICK_S)
    assert "max_pixels" in failed.message or "decompression bomb" in failed.message
    assert decoder.decode(encode(Image.new("RGB", (4, 4)), "PNG"), None).crops  # still works


def test_a_compressed_text_chunk_bomb_is_not_expanded(
    roots: tuple[Path, FetchSettings], decoder: ProcessDecoder
) -> None:
    """A zTXt chunk that inflates to 64 MiB: Pillow's MAX_TEXT_CHUNK stops it at 1 MiB."""
    root, settings = roots
    compressor = zlib.compressobj(9)
    zeros = b"\x00" * (1 << 20)
    text = b"".join(compressor.compress(zeros) for _ in range(64)) + compressor.flush()
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    bomb = png[:33] + png_chunk(b"zTXt", b"Comment\x00\x00" + text) + png[33:]
    run = run_event(put(root, "ztxt.png", bomb), settings, decoder)
    expect_failed(run, "image_undecodable", within_s=QUICK_S)


def test_a_huge_sparse_file_is_read_only_up_to_max_bytes(
    roots: tuple[Path, FetchSettings], decoder: ProcessDecoder
) -> None:
    root, settings = roots
    path = root / "sparse.png"
    with path.open("wb") as handle:
        handle.truncate(8 << 30)  # 8 GiB of holes
    run = run_event(path.as_uri(), settings, decoder)
    # Reading max_bytes + 1 is the price; the rest must never be read.
    expect_failed(run, "image_too_large", within_s=QUICK_S, memory_mb=MAX_BYTES / 2**20 * 3 + 32)


# ---- odd sizes and animations ------------------------------------------------------------


def test_a_1x1_image_is_one_1x1_crop(
    roots: tuple[Path, FetchSettings], decoder: ProcessDecoder
) -> None:
    root, settings = roots
    uri = put(root, "dot.png", encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"))
    prepared = expect_ok(run_event(uri, settings, decoder), [(1, 1)], within_s=QUICK_S)
    assert prepared.crops[0].getpixel((0, 0)) == (1, 2, 3)


@pytest.fixture(scope="module")
def narrow_decoder() -> Iterator[ProcessDecoder]:
    """A decoder process with fetch.max_pixels = 50000."""
    pool = make_process_decoder(max_pixels=50_000)
    yield pool
    pool.close()


@pytest.mark.parametrize("size", [(60_000, 1), (1, 60_000)])
def test_a_60000_pixel_line_decodes_under_max_pixels_and_is_refused_over_it(
    size: tuple[int, int],
    roots: tuple[Path, FetchSettings],
    decoder: ProcessDecoder,
    narrow_decoder: ProcessDecoder,
) -> None:
    """fetch.max_pixels caps width x height, whatever the aspect ratio (config/fetch.py)."""
    root, settings = roots
    uri = put(root, "line.png", encode(Image.new("L", size, 200), "PNG"))
    prepared = expect_ok(run_event(uri, settings, decoder), [size], within_s=QUICK_S)
    assert prepared.crops[0].getpixel((0, 0)) == (200, 200, 200)
    failed = expect_failed(
        run_event(uri, settings, narrow_decoder), "image_too_large", within_s=QUICK_S
    )
    assert "max_pixels=50000" in failed.message


def test_only_the_first_frame_of_a_3000_frame_gif_is_decoded(
    roots: tuple[Path, FetchSettings], decoder: ProcessDecoder
) -> None:
    root, settings = roots
    data = gif_with_frames(3000)
    with Image.open(io.BytesIO(data)) as gif:
        assert getattr(gif, "n_frames", 1) == 3000  # the file is what it claims
    uri = put(root, "anim.gif", data)
    prepared = expect_ok(run_event(uri, settings, decoder), [(48, 48)], within_s=QUICK_S)
    crop = prepared.crops[0]
    assert crop.getpixel((0, 0)) == crop.getpixel((47, 47)) == (255, 0, 0)  # frame 0 is red


# ---- modes -------------------------------------------------------------------------------


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    return encode(image, "PNG", transparency=0)


def _gif_with_transparency() -> bytes:
    image = Image.new("P", (16, 16), 1)
    image.putpalette([0, 0, 0, 0, 255, 0])
    return encode(image, "GIF", transparency=1)


MODES: dict[str, tuple[bytes, tuple[int, int, int], int]] = {
    # name: (file, expected colour of every pixel, tolerance)
    "cmyk-jpeg": (encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), (255, 0, 0), 8),
    "grey-jpeg": (encode(Image.new("L", (16, 16), 90), "JPEG"), (90, 90, 90), 3),
    # 16-bit samples are scaled to 8 bits: 25700 / 65535 * 255 = 100.
    "i16-png": (encode(Image.new("I;16", (16, 16), 25700), "PNG"), (100, 100, 100), 1),
    "palette-transparent-png": (_palette_with_transparency(), (255, 255, 255), 0),
    "palette-transparent-gif": (_gif_with_transparency(), (255, 255, 255), 0),
    "la-transparent-png": (encode(Image.new("LA", (16, 16), (0, 0)), "PNG"), (255, 255, 255), 0),
    "la-opaque-png": (encode(Image.new("LA", (16, 16), (40, 255)), "PNG"), (40, 40, 40), 0),
    "1bit-png": (encode(Image.new("1", (16, 16), 1), "PNG"), (255, 255, 255), 0),
    "1bit-bmp": (encode(Image.new("1", (16, 16), 0), "BMP"), (0, 0, 0), 0),
    "rgba-transparent-png": (
        encode(Image.new("RGBA", (16, 16), (9, 9, 9, 0)), "PNG"),
        (255, 255, 255),
        0,
    ),
    "rgba-webp": (
        encode(Image.new("RGBA", (16, 16), (0, 0, 255, 255)), "WEBP", lossless=True),
        (0, 0, 255),
        0,
    ),
}


@pytest.mark.parametrize("name", list(MODES))
def test_every_mode_becomes_rgb_crops(
    name: str, roots: tuple[Path, FetchSettings], decoder: ProcessDecoder
) -> None:
    root, settings = roots
    data, colour, tolerance = MODES[name]
    prepared = expect_ok(
        run_event(put(root, name, data), settings, decoder), [(16, 16)], within_s=QUICK_S
    )
    crop = prepared.crops[0]
    assert crop.mode == "RGB"
    for x, y in [(0, 0), (8, 8), (15, 15)]:
        pixel = crop.getpixel((x, y))
        assert isinstance(pixel, tuple)
        assert all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=True)), pixel


SIXTEEN_BIT_BUG = (
    "consumer/decode/images.py to_rgb: a 16-bit greyscale PNG (mode I;16) goes through "
    "Image.convert('RGB'), which clips each 0-65535 sample to 0-255 instead of scaling it, "
    "so every sample over 255 (all but the darkest 0.4% of the range) becomes white and "
    "a 16-bit face reaches the model as a white square. Fix: for I;16 / I;16B / I modes, "
    "scale first, e.g. image.point(lambda v: v / 256).convert('L') (or numpy >> 8), then RGB."
)


def test_a_16bit_mid_grey_stays_mid_grey(
    roots: tuple[Path, FetchSettings], decoder: ProcessDecoder
) -> None:
    root, settings = roots
    uri = put(root, "grey16.png", encode(Image.new("I;16", (16, 16), 32768), "PNG"))
    prepared = expect_ok(run_event(uri, settings, decoder), [(16, 16)], within_s=QUICK_S)
    pixel = prepared.crops[0].getpixel((8, 8))
    assert isinstance(pixel, tuple)
    assert all(abs(channel - 128) <= 1 for channel in pixel), pixel


AMPLIFICATION_BUG = (
    "consumer/decode/decoding.py FrameCropper / consumer/decode/pool.py: nothing bounds the total "
    "size of an event's crops. A ~5 KB 1000x1000 PNG (well under max_pixels) with 64 "
    "face boxes that each cover the whole frame yields 64 x 3 MB = 183 MB of RGB crops, "
    "which the decoder process sends back (decode.max_memory_mb caps only the child) and "
    "this process buffers: ~430 MB peak RSS growth from one small event; with the "
    "defaults (max_pixels 40 M, max_memory_mb 2048) a 1600x1600 frame gives 468 MB of crops "
    "and over 1 GB of peak growth, and fetch.threads events may do it at once. Fix: cap the "
    "summed (grown) box area per event, e.g. at fetch.max_pixels, raising image_too_large "
    "in FrameCropper before cropping; and/or downscale crops to the model's input size in "
    "the child; and derive _MAX_REPLY_BYTES from that cap instead of 2 GiB."
)


def test_64_full_frame_boxes_do_not_multiply_memory(
    roots: tuple[Path, FetchSettings], decoder: ProcessDecoder
) -> None:
    root, settings = roots
    data = encode(Image.new("RGB", (1000, 1000), (10, 20, 30)), "PNG")
    assert len(data) < 10_000
    faces = [face_box(0, 0, 1000, 1000)] * 64
    run = run_event(put(root, "many-faces.png", data), settings, decoder, faces)
    if isinstance(run.outcome, PreparedEvent):
        held = sum(c.width * c.height * 3 for c in run.outcome.crops)
        assert held < 64 << 20, f"{held >> 20} MB of crops from a {len(data)}-byte file"
        expect_ok(run, within_s=DECODE_BOUND_S)
    else:
        expect_failed(run, "image_too_large", "bad_face_box", within_s=DECODE_BOUND_S)
    assert run.growth_mb < MEMORY_BOUND_MB


@pytest.mark.parametrize("exact", [True, False], ids=["vmhwm", "sampled"])
def test_memory_meter_sees_a_buffered_bomb(exact: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory bound can fail: buffering 300 MB inside the meter is seen, in both modes."""
    if not exact:
        monkeypatch.setattr(security_conftest, "_reset_peak", lambda: False)
    with security_conftest.PeakMemory() as memory:
        bomb = b"\x01" * (300 << 20)
        time.sleep(0.05)  # a bomb being buffered is held far longer than this
        del bomb
    assert memory.growth_mb > MEMORY_BOUND_MB
