"""The wire formats: exported JSON Schemas match the models; bad events name their field."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from schemas import DeadLetterHeaders, EmotionResult, FrameEvent
from schemas.export import MODELS, VERSIONS, render, schema_path

VALID = {
    "event_id": "evt-1",
    "stream_id": "cam-7",
    "captured_at": "2026-11-28T12:00:00.250Z",
    "image": "https://images.example/frames/1.jpg",
    "faces": [{"x": 10, "y": 20, "width": 48, "height": 48}],
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_exported_schema_files_match_models(name: str) -> None:
    on_disk = schema_path(name).read_text(encoding="utf-8")
    assert on_disk == render(name), (
        f"{schema_path(name).name} drifted from the model; run `python -m schemas.export`"
    )


def test_valid_event_round_trips() -> None:
    event = FrameEvent.model_validate_json(json.dumps(VALID))
    assert event.faces is not None and event.faces[0].width == 48
    assert FrameEvent.model_validate_json(event.model_dump_json()) == event


def test_faces_are_optional() -> None:
    event = FrameEvent.model_validate_json(json.dumps({**VALID, "faces": None}))
    assert event.faces is None


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"event_id": 5}, "event_id", "valid string"),
        ({"stream_id": ""}, "stream_id", "at least 1"),
        ({"captured_at": "2026-11-28T12:00:00"}, "captured_at", "timezone"),
        ({"captured_at": "yesterday"}, "captured_at", "datetime"),
        ({"image": "ftp://host/x.jpg"}, "image", "file://, http://, https://"),
        ({"image": "file://host/x.jpg"}, "image", "file:///absolute/path"),
        ({"image": "/tmp/x.jpg"}, "image", "not supported"),
        ({"image": "data:image/png;base64"}, "image", "data:<type>;base64,<data>"),
        ({"image": "http://host/" + "a" * 5000}, "image", "at most 4096"),
        ({"faces": []}, "faces", "leave it out"),
        ({"faces": [{"x": 1, "y": 1, "width": 0, "height": 5}]}, "faces.0.width", "greater"),
        ({"faces": [{"x": "1", "y": 1, "width": 5, "height": 5}]}, "faces.0.x", "integer"),
        ({"faces": [{"x": 1, "y": 1, "width": 5, "height": 5, "z": 1}]}, "faces.0.z", "Extra"),
        ({"schema_version": 2}, "schema_version", "1"),
        ({"colour": "red"}, "colour", "Extra inputs"),
    ],
)
def test_invalid_event_names_the_field(change: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as info:
        FrameEvent.model_validate_json(json.dumps({**VALID, **change}))
    errors = info.value.errors()
    locs = [".".join(str(p) for p in e["loc"]) for e in errors]
    assert any(loc.startswith(field) for loc in locs), locs
    assert words in str(info.value)


def test_missing_required_field_is_named() -> None:
    with pytest.raises(ValidationError) as info:
        FrameEvent.model_validate_json(
            json.dumps({k: v for k, v in VALID.items() if k != "captured_at"})
        )
    assert info.value.errors()[0]["loc"] == ("captured_at",)


def test_too_many_faces_are_rejected() -> None:
    boxes = [{"x": 0, "y": 0, "width": 1, "height": 1}] * 65
    with pytest.raises(ValidationError, match="faces"):
        FrameEvent.model_validate_json(json.dumps({**VALID, "faces": boxes}))


def test_result_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        EmotionResult.model_validate({"surprise": 1})


def test_data_uri_is_a_valid_image_and_may_exceed_the_url_limit() -> None:
    image = "data:image/png;base64," + "A" * 8000
    event = FrameEvent.model_validate_json(json.dumps({**VALID, "image": image}))
    assert event.image == image


def _dead_letter_headers() -> dict[str, str]:
    from datetime import UTC, datetime

    why = DeadLetterHeaders(
        error_kind="image_fetch_failed",
        error_message="HTTP 503 from images.example; retried 3 times",
        source_topic="frames",
        source_partition=2,
        source_offset=41,
        event_id="evt-1",
        attempts=3,
        failed_at=datetime(2026, 12, 1, 5, 0, tzinfo=UTC),
        worker_id="pod-1:7",
        payload="kept",
    )
    return {name: value.decode() for name, value in why.encode()}


def test_dead_letter_headers_match_their_published_schema() -> None:
    """What the worker writes validates against schemas/dead_letter.schema.json, and the
    schema refuses what a reader could not parse."""
    import jsonschema

    schema = json.loads(schema_path("dead_letter").read_text(encoding="utf-8"))
    headers = _dead_letter_headers()
    assert headers["emotion.source.offset"] == "41" and headers["emotion.attempts"] == "3"
    assert headers["emotion.dead_letter.version"] == "2"
    jsonschema.validate(headers, schema)
    for bad in ({"emotion.attempts": "0"}, {"emotion.error.kind": "colour"}, {"emotion.x": "1"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**headers, **bad}, schema)
    without_event = dict(headers)
    del without_event["emotion.event.id"]
    jsonschema.validate(without_event, schema)  # the event id is absent for unreadable events


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_schema_names_its_draft_and_versioned_id(name: str) -> None:
    import jsonschema

    schema = json.loads(schema_path(name).read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == f"urn:emotion-worker:schema:{name}:v{VERSIONS[name]}"
    jsonschema.Draft202012Validator.check_schema(schema)


RESULT_V2 = {
    "schema_version": 2,
    "result_id": "0b6f2f4e-3c1a-5d7e-9a57-2f5f8c1d7e21",
    "event_id": "evt-1",
    "stream_id": "cam-7",
    "source": {"topic": "frames", "partition": 0, "offset": 3},
    "captured_at": "2026-12-01T12:00:00Z",
    "processed_at": "2026-12-01T12:00:01Z",
    "model_id": "llava-fer-small",
    "status": "ok",
    "faces": [
        {
            "status": "classified",
            "box": {"x": 0, "y": 0, "width": 48, "height": 48},
            "quality": {
                "width": 48,
                "height": 48,
                "sharpness": 310.5,
                "brightness": 0.52,
                "contrast": 0.41,
                "vouched_by": "event",
                "score": 1.0,
                "flags": [],
            },
            "label": "happy",
            "confidence": 0.9,
            "scores": {"happy": 0.9, "sad": 0.1},
        },
        {
            "status": "skipped",
            "box": {"x": 50, "y": 0, "width": 20, "height": 20},
            "quality": {
                "width": 20,
                "height": 20,
                "sharpness": 4.0,
                "brightness": 0.1,
                "contrast": 0.05,
                "vouched_by": "detector",
                "score": 0.12,
                "flags": ["small", "blurry", "dark"],
            },
            "reason": "quality 0.12 < faces.min_quality 0.5 (small, blurry, dark)",
        },
    ],
}


def test_a_v2_result_validates_and_a_skipped_face_has_no_label() -> None:
    import jsonschema

    schema = json.loads(schema_path("emotion_result").read_text(encoding="utf-8"))
    jsonschema.validate(RESULT_V2, schema)
    result = EmotionResult.model_validate(RESULT_V2)
    assert [type(f).__name__ for f in result.faces] == ["ClassifiedFace", "SkippedFace"]
    skipped = dict(RESULT_V2["faces"][1], label="happy")  # type: ignore[call-overload]
    with pytest.raises(ValidationError, match="label"):
        EmotionResult.model_validate({**RESULT_V2, "faces": [skipped]})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**RESULT_V2, "faces": [skipped]}, schema)


def test_the_v1_result_schema_is_kept_beside_the_current_one() -> None:
    """Readers still on version 1 need its schema as it was; v2 records do not match it."""
    import jsonschema

    old = json.loads(schema_path("emotion_result.v1").read_text(encoding="utf-8"))
    assert old["$id"] == "urn:emotion-worker:schema:emotion_result:v1"
    assert old["properties"]["schema_version"]["const"] == 1
    v1 = {
        **RESULT_V2,
        "schema_version": 1,
        "faces": [
            {k: v for k, v in RESULT_V2["faces"][0].items() if k not in ("status", "quality")}  # type: ignore[attr-defined]
        ],
    }
    jsonschema.validate(v1, old)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(RESULT_V2, old)
