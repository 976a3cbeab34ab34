"""Poison events spread through a stream: each becomes a dead letter, nothing stalls."""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from tests.faults.checker import Stream
from tests.support.events import event_bytes
from tests.support.http_server import ImageServer
from tests.support.kafka import end_offsets
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.kafka


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png() -> bytes:
    """A valid 100 KB-ish PNG header declaring 60000x60000 pixels (3.6 G pixels)."""
    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + _png_chunk(b"IEND", b"")
    )


def truncated_png(face: Path) -> bytes:
    """A real face PNG cut in half: the header parses, decoding the pixels raises."""
    data = face.read_bytes()
    return data[: len(data) // 2]


def corrupt_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    data[200:260] = b"\xff" * 60  # garbage inside the entropy-coded data
    return bytes(data[:-100])


def test_poison_events_spread_through_the_stream(
    make_stream: Callable[..., Stream],
    start_worker: Callable[..., WorkerProcess],
    face_paths: list[Path],
    tmp_path: Path,
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    (served / "bomb.png").write_bytes(bomb_png())
    (served / "face.png").write_bytes(face_paths[0].read_bytes())
    (tmp_path / "truncated.png").write_bytes(truncated_png(face_paths[1]))
    (tmp_path / "corrupt.jpg").write_bytes(corrupt_jpeg())
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    stream = make_stream(partitions=3)
    stream.publish(face_paths, 90)
    _, good = event_bytes(face_paths[0])
    base = json.loads(good)

    def event(**fields: object) -> bytes:
        return json.dumps({**base, **fields}).encode()

    with ImageServer(served) as server:
        poison: list[tuple[bytes, str]] = [
            (b"", "not_json"),
            (b"\x00\x01\x02", "not_json"),
            (b'{"event_id": "x"', "not_json"),
            (b"[]", "invalid_event"),
            (b"null", "invalid_event"),
            (event(event_id=None), "invalid_event"),
            (event(captured_at="2026-13-45T99:00:00Z"), "invalid_event"),
            (event(image="gopher://x/y"), "invalid_event"),
            (event(image="file:///etc/../" + "a" * 5000), "invalid_event"),
            (event(faces=[{"x": -1, "y": 0, "width": 1, "height": 1}]), "invalid_event"),
            (event(faces=[{"x": 0, "y": 0, "width": 1, "height": 1}] * 100), "invalid_event"),
            (event(schema_version=9), "invalid_event"),
            (event(extra_field=True), "invalid_event"),
            (event(stream_id="x" * 70_000), "event_too_large"),
            (event(image=(tmp_path / "missing.png").as_uri()), "image_not_found"),
            (event(image=(tmp_path / "folder.png").as_uri()), "image_not_found"),
            (event(image=(tmp_path / "empty.png").as_uri()), "image_undecodable"),
            (event(image=(tmp_path / "truncated.png").as_uri()), "image_undecodable"),
            (event(image=(tmp_path / "corrupt.jpg").as_uri()), "image_undecodable"),
            (event(image=f"{server.url}/bomb.png"), "image_too_large"),
            (event(image=f"{server.url}/nope.png"), "image_not_found"),
            (event(image=f"{server.url}/status/500"), "image_fetch_failed"),
            (event(image=f"{server.url}/sleep/3/face.png"), "image_fetch_failed"),
            (event(image="http://127.0.0.1:9/refused.png"), "image_fetch_failed"),
            # Refused before connecting: only 127.0.0.1 is in fetch.allow_hosts.
            (event(image="http://169.254.169.254/latest/meta-data/"), "image_fetch_refused"),
            (event(image="http://10.0.0.5/x.png"), "image_fetch_refused"),
            (event(image=f"{server.url}/../x".replace("//", "//user@", 1)), "image_fetch_refused"),
            (event(image="data:image/png;base64,!!!!"), "image_undecodable"),
            (event(faces=[{"x": 500, "y": 500, "width": 5, "height": 5}]), "bad_face_box"),
        ]
        expected: dict[tuple[int, int], str] = {}
        for index, (value, kind) in enumerate(poison):
            (coord,) = stream.publish_poison([value], partition=index % 3)
            expected[coord] = kind
        worker = start_worker(
            **stream.settings(
                fetch__timeout_s="1",
                fetch__retries="1",
                fetch__retry_backoff_s="0.05",
                fetch__max_pixels="50000000",
            )
        )
        report = stream.report("6. poison events", note=f"{len(poison)} kinds of poison")
        letters = stream.dead_letters()
        assert worker.stop() == 0, worker.log_text()[-3000:]

    assert report.missing == 0 and report.duplicates == 0
    got = {(d.source.partition, d.source.offset): d for d in letters}
    assert set(got) == set(expected)
    wrong = {
        c: (got[c].error_kind, k, got[c].error_message[:80])
        for c, k in expected.items()
        if got[c].error_kind != k
    }
    assert wrong == {}
    for letter in letters:
        assert letter.error_message and letter.attempts >= 1
    retried = [d for d in letters if d.error_kind == "image_fetch_failed"]
    assert [d.attempts for d in retried] == [2] * len(retried), [
        (d.attempts, d.error_message) for d in retried
    ]  # one retry, then a dead letter
    assert stream.committed() == end_offsets(stream.bootstrap, stream.input_topic, 3)
