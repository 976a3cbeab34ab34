"""What a window needs of one result record: its id, stream, times and faces.

Results of schema 2 (0.4.0 and later) and of schema 1 (every face classified) are read,
so that a results topic that still holds records from before an upgrade is summarized
whole. Anything else is not a result: `read_result` raises NotAResultError and the loop counts
it as invalid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from schemas import ClassifiedFace, EmotionResult, FaceBox, SourceCoordinates

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def to_ms(moment: datetime) -> int:
    """Milliseconds since the epoch, in integer arithmetic (no float rounding)."""
    return (moment - EPOCH) // _MS


def from_ms(ms: int) -> datetime:
    return EPOCH + ms * _MS


@dataclass(frozen=True, slots=True)
class FaceFacts:
    """One face: its top label, the label's score and every label's; label None: skipped."""

    label: str | None
    confidence: float = 0.0
    scores: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ResultFacts:
    result_id: str
    stream_id: str
    captured_ms: int
    processed_ms: int
    faces: tuple[FaceFacts, ...]


class NotAResultError(ValueError):
    """The record is not a result of schema 1 or 2."""


class _FaceV1(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    box: FaceBox
    label: str
    confidence: float
    scores: dict[str, float]


class _ResultV1(BaseModel):
    """A result as 0.3.x and earlier wrote it: every face classified, no quality."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: Literal[1]
    result_id: str
    event_id: str
    stream_id: str
    source: SourceCoordinates
    captured_at: AwareDatetime
    processed_at: AwareDatetime
    model_id: str
    status: Literal["ok", "no_face"]
    faces: list[_FaceV1]


def facts_of(result: EmotionResult) -> ResultFacts:
    """The facts of a schema 2 result."""
    faces = tuple(
        FaceFacts(face.label, face.confidence, tuple(face.scores.items()))
        if isinstance(face, ClassifiedFace)
        else FaceFacts(None)
        for face in result.faces
    )
    return ResultFacts(
        result.result_id,
        result.stream_id,
        to_ms(result.captured_at),
        to_ms(result.processed_at),
        faces,
    )


def read_result(value: bytes | None) -> ResultFacts:
    """The facts of a result record's value; NotAResultError if it is none."""
    if not value:
        raise NotAResultError("empty record")
    try:
        version = json.loads(value).get("schema_version")
    except (ValueError, AttributeError) as exc:
        raise NotAResultError(f"not a JSON object: {exc}") from exc
    try:
        if version == 1:
            old = _ResultV1.model_validate_json(value)
            faces = tuple(
                FaceFacts(f.label, f.confidence, tuple(f.scores.items())) for f in old.faces
            )
            return ResultFacts(
                old.result_id,
                old.stream_id,
                to_ms(old.captured_at),
                to_ms(old.processed_at),
                faces,
            )
        return facts_of(EmotionResult.model_validate_json(value))
    except ValidationError as exc:
        raise NotAResultError(
            f"not a result of schema 1 or 2: {exc.error_count()} error(s)"
        ) from exc
