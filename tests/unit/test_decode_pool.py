"""Decoder processes: crops come back intact, and a crash or hang costs one event only."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator

import pytest
from PIL import Image

from consumer.config import DecodeSettings, FaceSettings
from consumer.decode.pool import InlineDecoder, ProcessDecoder
from consumer.errors import EventError
from schemas import FaceBox

MAX_PIXELS = 40_000_000
MAX_BYTES = 20 << 20


def png(size: tuple[int, int], mode: str = "RGB", colour: int | tuple[int, ...] = 0) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, colour).save(out, "PNG")
    return out.getvalue()


def gradient(size: tuple[int, int]) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size)
    image.putdata([(x % 256, y % 256, (x + y) % 256) for y in range(height) for x in range(width)])
    return image


@pytest.fixture
def faulty() -> Iterator[ProcessDecoder]:
    decoder = ProcessDecoder(
        DecodeSettings(workers=1, timeout_s=2.0),
        FaceSettings(),
        MAX_PIXELS,
        MAX_BYTES,
        module="tests.support.faulty_decoder",
    )
    yield decoder
    decoder.close()


def test_process_crops_equal_in_process_crops() -> None:
    frame = gradient((160, 120))
    data = io.BytesIO()
    frame.save(data, "PNG")
    boxes = [FaceBox(x=10, y=20, width=50, height=40), FaceBox(x=100, y=60, width=60, height=60)]
    decoder = ProcessDecoder(
        DecodeSettings(workers=1), FaceSettings(margin=0.1), MAX_PIXELS, MAX_BYTES
    )
    try:
        remote = decoder.decode(data.getvalue(), boxes)
    finally:
        decoder.close()
    local = InlineDecoder(FaceSettings(margin=0.1), MAX_PIXELS).decode(data.getvalue(), boxes)
    assert remote.boxes == local.boxes
    assert [c.tobytes() for c in remote.crops] == [c.tobytes() for c in local.crops]
    # The margin grew the first box by 10% each side and the second was clipped at the edge.
    assert remote.boxes[0] == FaceBox(x=5, y=16, width=60, height=48)
    assert remote.boxes[1] == FaceBox(x=94, y=54, width=66, height=66)


def test_event_errors_come_back_with_their_kind() -> None:
    decoder = ProcessDecoder(DecodeSettings(workers=1), FaceSettings(), MAX_PIXELS, MAX_BYTES)
    try:
        with pytest.raises(EventError) as info:
            decoder.decode(b"not an image", None)
        assert info.value.kind == "image_undecodable"
        with pytest.raises(EventError) as info:
            decoder.decode(png((40, 40)), [FaceBox(x=50, y=0, width=5, height=5)])
        assert info.value.kind == "bad_face_box" and "faces[0]" in info.value.message
        # The process survived both and still works.
        assert decoder.decode(png((40, 30)), None).boxes == [FaceBox(x=0, y=0, width=40, height=30)]
        assert decoder.crashes == 0
    finally:
        decoder.close()


def test_a_crash_is_one_dead_letter_and_the_pool_recovers(faulty: ProcessDecoder) -> None:
    with pytest.raises(EventError) as info:
        faulty.decode(b"CRASH", None)
    assert info.value.kind == "image_undecodable"
    assert "crashed" in info.value.message and "SIGSEGV" in info.value.message
    assert faulty.crashes == 1
    # The next image gets a fresh process.
    assert len(faulty.decode(png((30, 30)), None).crops) == 1


def test_an_exit_is_reported_with_its_status(faulty: ProcessDecoder) -> None:
    with pytest.raises(EventError) as info:
        faulty.decode(b"EXIT", None)
    assert "exit status 3" in info.value.message
    assert len(faulty.decode(png((30, 30)), None).crops) == 1


def test_a_hang_is_stopped_at_the_timeout(faulty: ProcessDecoder) -> None:
    started = time.monotonic()
    with pytest.raises(EventError) as info:
        faulty.decode(b"HANG", None)
    elapsed = time.monotonic() - started
    assert info.value.kind == "image_undecodable" and "decode.timeout_s=2.0" in info.value.message
    assert 1.9 <= elapsed < 10
    assert faulty.timeouts == 1
    assert len(faulty.decode(png((30, 30)), None).crops) == 1


def test_memory_cap_turns_an_allocation_bomb_into_image_too_large() -> None:
    # 9000x9000 passes max_pixels, compresses to a few hundred KB, and needs ~240 MB
    # as RGB: more than the 512 MB address-space cap leaves after the libraries.
    data = png((9000, 9000), "L", 7)
    decoder = ProcessDecoder(
        DecodeSettings(workers=1, max_memory_mb=512), FaceSettings(), MAX_PIXELS, MAX_BYTES
    )
    try:
        with pytest.raises(EventError) as info:
            decoder.decode(data, None)
        assert info.value.kind == "image_too_large", info.value.message
        assert len(decoder.decode(png((30, 30)), None).crops) == 1
    finally:
        decoder.close()


def test_processes_are_retired_after_max_tasks() -> None:
    decoder = ProcessDecoder(
        DecodeSettings(workers=1, max_tasks_per_process=2), FaceSettings(), MAX_PIXELS, MAX_BYTES
    )
    try:
        pids = set()
        for _ in range(5):
            decoder.decode(png((20, 20)), None)
            process = decoder._idle.queue[0]
            if process is not None:
                pids.add(process.proc.pid)
        assert len(pids) >= 2
    finally:
        decoder.close()


def test_ctrl_c_to_the_process_group_leaves_decoder_processes_to_the_worker() -> None:
    """SIGINT (a terminal's Ctrl-C reaches every process of the group) must not abort a
    decoder process with a KeyboardInterrupt traceback: the worker drains and closes it."""
    import os
    import signal

    decoder = ProcessDecoder(DecodeSettings(workers=1), FaceSettings(), MAX_PIXELS, MAX_BYTES)
    try:
        decoder.decode(png((20, 20)), None)
        process = decoder._idle.queue[0]
        assert process is not None
        os.kill(process.proc.pid, signal.SIGINT)
        time.sleep(0.3)
        assert process.proc.poll() is None  # still alive
        assert decoder.decode(png((30, 20)), None).boxes == [FaceBox(x=0, y=0, width=30, height=20)]
        assert decoder.crashes == 0
    finally:
        decoder.close()
