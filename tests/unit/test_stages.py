"""Per-event stages with plain values: parse, prepare, and encode results and dead letters."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from consumer.config import DecodeSettings, FaceSettings, FetchSettings
from consumer.decode.pool import InlineDecoder, make_decoder
from consumer.errors import EventError
from consumer.stream.records import FailedEvent, InputRecord, PreparedEvent
from consumer.stream.stages import encode_dead_letter, encode_result, parse_event, prepare_event
from schemas import DeadLetter, EmotionResult, FrameEvent, result_id_for
from tests.conftest import FER_FACES

DECODER = InlineDecoder(FaceSettings(), max_pixels=10_000_000)


def record(value: bytes, offset: int = 7) -> InputRecord:
    return InputRecord("frames", 2, offset, b"cam", value, (("trace", b"\x01\x02"),), 1000)


def event_json(**extra: object) -> bytes:
    base = {
        "event_id": "e1",
        "stream_id": "cam",
        "captured_at": "2026-11-28T10:00:00Z",
        "image": "file:///nowhere.png",
    }
    return json.dumps({**base, **extra}).encode()


@pytest.mark.parametrize(
    ("value", "kind", "words"),
    [
        (b"", "not_json", "not UTF-8 JSON"),
        (b"\x00\xff", "not_json", "not UTF-8 JSON"),
        (b"[1, 2]", "invalid_event", "field (root)"),
        (event_json(stream_id=3), "invalid_event", "field stream_id"),
        (b"x" * 2000, "event_too_large", "flow.max_event_bytes=1000"),
    ],
)
def test_parse_event_errors(value: bytes, kind: str, words: str) -> None:
    with pytest.raises(EventError) as info:
        parse_event(record(value), max_event_bytes=1000)
    assert info.value.kind == kind
    assert words in info.value.message


def test_prepare_turns_fetch_errors_into_failed_events(tmp_path: Path) -> None:
    event = FrameEvent.model_validate_json(event_json(image=(tmp_path / "x.png").as_uri()))
    outcome = prepare_event(record(b"{}"), event, FetchSettings(file_roots=(tmp_path,)), DECODER)
    assert isinstance(outcome, FailedEvent)
    assert outcome.kind == "image_not_found" and outcome.event_id == "e1"


def test_prepare_crops_event_boxes(tmp_path: Path) -> None:
    path = tmp_path / "frame.png"
    Image.new("L", (120, 60)).save(path)
    event = FrameEvent.model_validate_json(
        event_json(
            image=path.as_uri(),
            faces=[
                {"x": 0, "y": 0, "width": 50, "height": 50},
                {"x": 60, "y": 10, "width": 40, "height": 40},
            ],
        )
    )
    outcome = prepare_event(record(b"{}"), event, FetchSettings(file_roots=(tmp_path,)), DECODER)
    assert isinstance(outcome, PreparedEvent)
    assert [c.size for c in outcome.crops] == [(50, 50), (40, 40)]
    assert all(c.mode == "RGB" for c in outcome.crops)


@dataclass
class Scores:
    label: str
    confidence: float
    scores: dict[str, float]


def test_encode_result_points_back_at_its_source(tmp_path: Path) -> None:
    path = tmp_path / "f.png"
    Image.new("L", (48, 48)).save(path)
    event = FrameEvent.model_validate_json(event_json(image=path.as_uri()))
    prepared = prepare_event(record(b"{}"), event, FetchSettings(file_roots=(tmp_path,)), DECODER)
    assert isinstance(prepared, PreparedEvent)
    outcome = encode_result(
        prepared, [Scores("sad", 0.6, {"sad": 0.6, "happy": 0.4})], "tiny", "emotions"
    )
    result = EmotionResult.model_validate_json(outcome.value)
    assert (result.source.topic, result.source.partition, result.source.offset) == ("frames", 2, 7)
    assert result.result_id == result_id_for(result.source)
    assert result.faces[0].label == "sad" and result.status == "ok"
    assert outcome.key == b"cam" and outcome.topic == "emotions"


def _frame_with_a_face(tmp_path: Path) -> Path:
    """A 200x100 grey frame with a real FER face, enlarged to 80 px, at (10, 10)."""
    frame = Image.new("RGB", (200, 100), (120, 120, 120))
    face = Image.open(sorted((FER_FACES / "sad").glob("*.png"))[0]).convert("RGB")
    frame.paste(face.resize((80, 80), Image.Resampling.BICUBIC), (10, 10))
    path = tmp_path / "frame.png"
    frame.save(path)
    return path


@pytest.mark.parametrize(
    ("boxes", "min_quality", "status", "kinds"),
    [
        ([(10, 10, 80, 80), (150, 10, 12, 12)], 0.5, "ok", ["classified", "skipped"]),
        ([(150, 10, 12, 12)], 0.5, "skipped", ["skipped"]),
        ([(10, 10, 80, 80), (150, 10, 12, 12)], None, "ok", ["classified", "classified"]),
    ],
)
def test_prepare_measures_quality_and_min_quality_skips(
    tmp_path: Path,
    boxes: list[tuple[int, int, int, int]],
    min_quality: float | None,
    status: str,
    kinds: list[str],
) -> None:
    path = _frame_with_a_face(tmp_path)
    faces = [{"x": x, "y": y, "width": w, "height": h} for x, y, w, h in boxes]
    event = FrameEvent.model_validate_json(event_json(image=path.as_uri(), faces=faces))
    settings = FaceSettings(min_quality=min_quality)
    prepared = prepare_event(
        record(b"{}"), event, FetchSettings(file_roots=(tmp_path,)), DECODER, settings
    )
    assert isinstance(prepared, PreparedEvent)
    assert [q.vouched_by for q in prepared.quality] == ["event"] * len(boxes)
    assert [(q.width, q.height) for q in prepared.quality] == [(w, h) for *_, w, h in boxes]
    scores = [Scores("sad", 0.6, {"sad": 0.6, "happy": 0.4}) for _ in prepared.model_crops]
    outcome = encode_result(prepared, scores, "tiny", "emotions")
    result = EmotionResult.model_validate_json(outcome.value)
    assert result.status == status == outcome.label
    assert [f.status for f in result.faces] == kinds
    assert [f.box.x for f in result.faces] == [x for x, *_ in boxes]
    assert result.faces[0].quality.flags == ([] if boxes[0][2] == 80 else ["small", "blurry"])
    assert outcome.face_labels == tuple("sad" for k in kinds if k == "classified")


def test_no_face_and_a_wrong_score_count() -> None:
    event = FrameEvent.model_validate_json(event_json())
    empty = PreparedEvent(record(b"{}"), event, [], [])
    result = EmotionResult.model_validate_json(encode_result(empty, [], "m", "out").value)
    assert result.status == "no_face" and result.faces == []
    with pytest.raises(ValueError, match="1 score"):
        encode_result(empty, [Scores("sad", 1.0, {"sad": 1.0})], "m", "out")


def test_result_ids_are_deterministic_and_distinct() -> None:
    a = record(b"", 1).source
    assert result_id_for(a) == result_id_for(record(b"", 1).source)
    assert result_id_for(a) != result_id_for(record(b"", 2).source)


def test_dead_letter_keeps_original_bytes_and_headers() -> None:
    original = b"\xff\x00 not json"
    failed = FailedEvent(record(original), "not_json", "event is not UTF-8 JSON", 1)
    outcome = encode_dead_letter(failed, "frames.dlq")
    letter = DeadLetter.from_record(outcome.key, outcome.value, outcome.headers)
    assert letter.value == original
    assert letter.key == b"cam"
    assert letter.headers == [("trace", b"\x01\x02")]
    assert letter.error_kind == "not_json" and letter.attempts == 1
    assert letter.source.offset == 7
    assert letter.payload == "kept" and letter.event_id is None
    assert outcome.topic == "frames.dlq" and outcome.is_dead_letter
    # The record is the input's: key and value bytes, its headers first and as they were.
    assert (outcome.key, outcome.value) == (b"cam", original)
    assert outcome.headers[0] == ("trace", b"\x01\x02")
    assert all(name.startswith("emotion.") for name, _ in outcome.headers[1:])


def test_dead_letter_without_payload_keeps_key_headers_and_reason() -> None:
    failed = FailedEvent(record(b'{"image": "data:..."}'), "invalid_event", "bad event", 1)
    outcome = encode_dead_letter(failed, "frames.dlq", include_payload=False)
    letter = DeadLetter.from_record(outcome.key, outcome.value, outcome.headers)
    assert outcome.value == b"" and letter.payload == "omitted"
    assert letter.key == b"cam" and letter.headers == [("trace", b"\x01\x02")]
    assert letter.error_kind == "invalid_event" and letter.error_message == "bad event"


def test_input_headers_under_the_workers_prefix_are_not_copied() -> None:
    """An upstream header named emotion.error.kind must not pose as the worker's verdict."""
    forged = (("emotion.error.kind", b"model_error"), ("keep", b"1"))
    failed = FailedEvent(replace(record(b"junk"), headers=forged), "not_json", "not JSON", 1)
    outcome = encode_dead_letter(failed, "dlq")
    assert [h for h in outcome.headers if h[0] == "emotion.error.kind"] == [
        ("emotion.error.kind", b"not_json")
    ]
    assert DeadLetter.from_record(outcome.key, outcome.value, outcome.headers).headers == [
        ("keep", b"1")
    ]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda h: [x for x in h if x[0] != "emotion.error.kind"], "emotion.error.kind"),
        (lambda h: [*h, ("emotion.attempts", b"2")], "emotion.attempts appears twice"),
        (
            lambda h: [(n, b"x" if n == "emotion.source.offset" else v) for n, v in h],
            "emotion.source.offset",
        ),
        (lambda h: [*h, ("emotion.colour", b"red")], "emotion.colour"),
    ],
)
def test_reading_a_bad_dead_letter_names_the_header(change: Any, named: str) -> None:
    failed = FailedEvent(record(b"junk"), "not_json", "not JSON", 1)
    outcome = encode_dead_letter(failed, "dlq")
    with pytest.raises(ValueError, match=re.escape(named)):
        DeadLetter.from_record(outcome.key, outcome.value, change(outcome.headers))


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_garbage_image_dead_letter_says_why_without_object_addresses(
    tmp_path: Path, isolation: str
) -> None:
    path = tmp_path / "frame.png"
    path.write_bytes(b"\x00\x01garbage, not an image" * 4)
    event = FrameEvent.model_validate_json(event_json(image=path.as_uri()))
    settings = DecodeSettings(isolation=isolation, workers=1)  # type: ignore[arg-type]
    decoder = make_decoder(settings, FaceSettings(), 10_000_000, 1 << 20)
    try:
        outcome = prepare_event(
            record(b"{}"), event, FetchSettings(file_roots=(tmp_path,)), decoder
        )
    finally:
        decoder.close()
    assert isinstance(outcome, FailedEvent)
    dead = encode_dead_letter(outcome, "dlq")
    letter = DeadLetter.from_record(dead.key, dead.value, dead.headers)
    assert letter.error_kind == "image_undecodable"
    message = letter.error_message
    assert message.startswith("image cannot be decoded: format not recognised"), message
    assert "92 bytes, starting 00 01 67 61 72 62 61 67 65" in message
    assert not re.search(r"at 0x[0-9a-fA-F]+|BytesIO", message)


def test_dead_letter_messages_never_carry_object_addresses() -> None:
    # The backstop, for exception texts no decoder message was written for.
    failed = FailedEvent(
        record(b"{}"),
        "image_undecodable",
        "ValueError: bad <_io.BytesIO object at 0x7f3a2c1d0e50> and <function f at 0xDEADBEEF>",
        1,
    )
    outcome = encode_dead_letter(failed, "dlq")
    letter = DeadLetter.from_record(outcome.key, outcome.value, outcome.headers)
    assert letter.error_message == "ValueError: bad <_io.BytesIO object> and <function f>"
    assert outcome.reason is not None and "0x" not in outcome.reason


def test_a_failed_event_is_made_one_way_from_its_error() -> None:
    """FailedEvent.from_error: kind and message from the error, ids from the event when it
    parsed, the larger of the fetch attempts counted and the error's own."""
    from consumer.stream.records import FailedEvent, InputRecord
    from schemas import FrameEvent

    record = InputRecord("frames", 0, 7, None, b"{}")
    error = EventError("image_fetch_failed", "http://x/face.png answered HTTP 503", retriable=True)
    error.attempts = 3
    unparsed = FailedEvent.from_error(record, EventError("not_json", "not JSON"))
    assert (unparsed.kind, unparsed.message, unparsed.fetch_attempts) == ("not_json", "not JSON", 1)
    assert unparsed.event_id is None and unparsed.stream_id is None
    event = FrameEvent.model_validate_json(
        '{"event_id": "e1", "stream_id": "cam-1", "captured_at": "2026-11-30T12:00:00Z",'
        ' "image": "http://x/face.png"}'
    )
    failed = FailedEvent.from_error(record, error, event, fetch_attempts=2)
    assert (failed.kind, failed.fetch_attempts, failed.event_id, failed.stream_id) == (
        "image_fetch_failed",
        3,
        "e1",
        "cam-1",
    )
    assert FailedEvent.from_error(record, error, event, fetch_attempts=5).fetch_attempts == 5
