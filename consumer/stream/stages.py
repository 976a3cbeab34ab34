"""The per-event stages as plain functions: parse, prepare (fetch, decode, crop), encode."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

import structlog
from pydantic import ValidationError

from consumer.config import FaceSettings, FetchSettings, describe_validation_error
from consumer.decode.decoding import Cropped
from consumer.decode.pool import Decoder, DecoderUnavailableError
from consumer.decode.quality import measure, skip_reason
from consumer.errors import EventError, plain_message
from consumer.fetch.references import fetch_with_retries
from consumer.stream.duplicate_keys import duplicate_key
from consumer.stream.records import FailedEvent, InputRecord, Outcome, PreparedEvent
from schemas import (
    ClassifiedFace,
    DeadLetterHeaders,
    EmotionResult,
    Face,
    FrameEvent,
    SkippedFace,
    original_headers,
    result_id_for,
)
from schemas.results import ResultStatus

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
log = structlog.get_logger("consumer.stream.stages")

# Results and dead letters are JSON; the header lets generic consumers and tools tell.
CONTENT_TYPE = ("content-type", b"application/json")
# Of the input record's headers only the W3C Trace Context ones pass on to its result or
# dead letter, so a trace continues through the worker. They are a standard with a known
# meaning; any other header could carry anything (credentials, routing hints meant for
# someone else) and would reach every reader of the output topics unasked. A dead letter
# is the input record itself and keeps all its headers, for replay.
TRACE_HEADERS = ("traceparent", "tracestate")
# Their content is not checked (that is the tracer's business), only bounded: the spec's
# traceparent is 55 bytes and its tracestate at most 32 entries of 256 characters, but a
# value past this is far more likely junk than a trace worth the bytes on every output.
MAX_TRACE_HEADER_BYTES = 512


class ScoredFace(Protocol):
    """What the engine returns per face (consumer.engine.FaceScores has this shape)."""

    @property
    def label(self) -> str: ...
    @property
    def confidence(self) -> float: ...
    @property
    def scores(self) -> dict[str, float]: ...


def parse_event(record: InputRecord, max_event_bytes: int) -> FrameEvent:
    """Validate the record's value as a frame event, or raise an EventError naming the field."""
    if len(record.value) > max_event_bytes:
        raise EventError(
            "event_too_large",
            f"event is {len(record.value)} bytes, over flow.max_event_bytes={max_event_bytes}",
        )
    try:
        # Strict UTF-8 first: json.loads would also accept UTF-16/32 and lone surrogates.
        text = record.value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EventError("not_json", f"event is not UTF-8 JSON: {exc}") from exc
    try:
        # pydantic's own JSON parser: it has a nesting limit (no RecursionError) and no
        # limit on integer digits to trip over, so any input ends as an EventError.
        event = FrameEvent.model_validate_json(text)
    except ValidationError as exc:
        invalid = [e for e in exc.errors() if e["type"] == "json_invalid"]
        if invalid:
            raise EventError("not_json", f"event is not UTF-8 JSON: {invalid[0]['msg']}") from exc
        raise EventError("invalid_event", describe_validation_error(exc, source="field")) from exc
    except (RecursionError, ValueError) as exc:  # defence in depth; not seen with pydantic
        raise EventError("not_json", f"event is not UTF-8 JSON: {exc}") from exc
    # pydantic keeps the last of duplicate keys silently; the scan runs only on events the
    # schema accepted, so it sees valid JSON of bounded depth, and other errors keep their
    # kinds and messages.
    try:
        duplicate = duplicate_key(text)
    except (RecursionError, ValueError) as exc:  # defence in depth; the schema bounds both
        raise EventError("invalid_event", f"event JSON could not be checked: {exc}") from exc
    if duplicate is not None:
        raise EventError("invalid_event", duplicate)
    return event


def prepare_event(
    record: InputRecord,
    event: FrameEvent,
    settings: FetchSettings,
    decoder: Decoder,
    faces: FaceSettings | None = None,
) -> PreparedEvent | FailedEvent:
    """Fetch, decode, find and crop the faces, and measure their quality; an event's
    failure becomes a FailedEvent. `faces` (default: the defaults) gives min_face_px and
    min_quality.

    Runs on a fetch thread. DecoderUnavailableError is not the event's fault and propagates:
    the worker stops rather than dead-lettering every event while decoding is broken.
    """
    attempts = 1
    try:
        data, attempts = fetch_with_retries(event.image, settings)
        cropped = decoder.decode(data, event.faces)
        return assess_faces(record, event, cropped, faces or FaceSettings(), attempts)
    except EventError as exc:
        return FailedEvent.from_error(record, exc, event, attempts)
    except DecoderUnavailableError:
        raise
    except Exception as exc:  # a bug or a hostile file must not take the worker down
        error = EventError("image_undecodable", f"{type(exc).__name__}: {exc}")
        return FailedEvent.from_error(record, error, event, attempts)


def assess_faces(
    record: InputRecord,
    event: FrameEvent,
    cropped: Cropped,
    faces: FaceSettings,
    fetch_attempts: int = 1,
) -> PreparedEvent:
    """The prepared event: every face's quality, and which faces faces.min_quality skips.

    Here, in the worker rather than the decoder process: the measures read decoded pixels
    only (numpy and Pillow's resize, no decoder) and cost well under a millisecond a face.
    """
    quality = [
        measure(crop, cropped.vouched_by, faces.min_face_px, cropped.face_found)
        for crop in cropped.crops
    ]
    reasons = {
        index: reason
        for index, q in enumerate(quality)
        if (reason := skip_reason(q, faces.min_quality)) is not None
    }
    return PreparedEvent(
        record, event, cropped.boxes, cropped.crops, fetch_attempts, quality, reasons
    )


def passed_headers(record: InputRecord) -> list[tuple[str, bytes]]:
    """The input's trace headers to copy onto what it becomes: the first value of each,
    unless it is over MAX_TRACE_HEADER_BYTES or null."""
    passed: dict[str, bytes] = {}
    for key, value in record.headers:
        if key not in TRACE_HEADERS or key in passed or value is None:
            continue
        if len(value) > MAX_TRACE_HEADER_BYTES:
            log.debug(
                "trace header dropped: too long",
                header=key,
                bytes=len(value),
                limit=MAX_TRACE_HEADER_BYTES,
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
            )
            continue
        passed[key] = value
    return list(passed.items())


def encode_result(
    prepared: PreparedEvent, scores: Sequence[ScoredFace], model_id: str, output_topic: str
) -> Outcome:
    """The result for one prepared event, keyed by stream id so each stream stays ordered.

    `scores` are the model's for `prepared.model_crops`, in order; skipped faces take their
    place in box order with their reason. Status: ok when a face was classified, skipped
    when every face was skipped, no_face when there is none.
    """
    event = prepared.event
    if len(prepared.quality) != len(prepared.boxes):
        raise ValueError(
            f"{len(prepared.boxes)} face(s) but {len(prepared.quality)} quality measure(s)"
        )
    if len(scores) != len(prepared.boxes) - len(prepared.skip_reasons):
        raise ValueError(
            f"{len(scores)} score(s) for {len(prepared.boxes)} face(s), "
            f"{len(prepared.skip_reasons)} of them skipped"
        )
    faces: list[Face] = []
    classified: list[str] = []
    given = iter(scores)
    for index, (box, quality) in enumerate(zip(prepared.boxes, prepared.quality, strict=True)):
        reason = prepared.skip_reasons.get(index)
        if reason is not None:
            faces.append(SkippedFace(box=box, quality=quality, reason=reason))
            continue
        s = next(given)
        faces.append(
            ClassifiedFace(
                box=box, quality=quality, label=s.label, confidence=s.confidence, scores=s.scores
            )
        )
        classified.append(s.label)
    status: ResultStatus = "ok" if classified else "skipped" if faces else "no_face"
    source = prepared.record.source
    result = EmotionResult(
        result_id=result_id_for(source),
        event_id=event.event_id,
        stream_id=event.stream_id,
        source=source,
        captured_at=event.captured_at,
        processed_at=datetime.now(UTC),
        model_id=model_id,
        status=status,
        faces=faces,
    )
    return Outcome(
        record=prepared.record,
        topic=output_topic,
        key=event.stream_id.encode(),
        value=result.model_dump_json().encode(),
        is_dead_letter=False,
        headers=[
            ("event_id", event.event_id.encode()),
            CONTENT_TYPE,
            *passed_headers(prepared.record),
        ],
        event_id=event.event_id,
        label=status,
        captured_at=event.captured_at,
        stream_id=event.stream_id,
        face_labels=tuple(classified),  # the classified faces' labels; skipped have none
    )


def encode_dead_letter(
    failed: FailedEvent, dead_letter_topic: str, include_payload: bool = True
) -> Outcome:
    """The dead letter for a failed record: the record as it was, with why in headers.

    Key, value and headers stay the input's bytes (schemas/dead_letter.py), so standard
    tools can replay it; `include_payload=False` empties the value (a data: event's value
    is a face). Input headers under `emotion.` are the worker's namespace and not copied.
    """
    record = failed.record
    # A backstop: messages that quote an exception must not carry object addresses.
    message = plain_message(failed.message)
    why = DeadLetterHeaders(
        error_kind=failed.kind,
        error_message=message,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        event_id=failed.event_id,
        attempts=failed.fetch_attempts,
        failed_at=datetime.now(UTC),
        worker_id=WORKER_ID,
        payload="kept" if include_payload else "omitted",
    )
    return Outcome(
        record=record,
        topic=dead_letter_topic,
        key=record.key,
        value=record.value if include_payload else b"",
        is_dead_letter=True,
        headers=[*original_headers(record.headers), *why.encode()],
        event_id=failed.event_id,
        reason=f"{failed.kind}: {message}",
        label=failed.kind,
        stream_id=failed.stream_id,
    )
