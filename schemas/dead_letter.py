"""The dead letter published for an input record that cannot become a result."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.events import SourceCoordinates

ErrorKind = Literal[
    "not_json",  # the value is not UTF-8 JSON
    "invalid_event",  # JSON, but not a valid frame event
    "event_too_large",  # the value is larger than flow.max_event_bytes
    "image_not_found",  # the referenced file or URL does not exist (404)
    "image_fetch_failed",  # network error, timeout or server error while fetching
    "image_fetch_refused",  # the URL or address is not allowed (SSRF guard, file roots)
    "image_too_large",  # more bytes or pixels than the configured caps
    "image_undecodable",  # not an image Pillow can decode
    "bad_face_box",  # a face box lies outside the image
    "model_error",  # the model failed on this event's faces
]


class Header(BaseModel):
    """One Kafka header of the original record, value in base64url."""

    # Raw bytes travel as base64 in JSON: the original record may not be UTF-8 at all.
    model_config = ConfigDict(
        extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )

    key: str
    value: bytes | None


class DeadLetter(BaseModel):
    """An input record the worker gave up on, with everything needed to replay it."""

    # Raw bytes travel as base64 in JSON: the original record may not be UTF-8 at all.
    model_config = ConfigDict(
        extra="forbid", frozen=True, ser_json_bytes="base64", val_json_bytes="base64"
    )

    schema_version: Literal[1] = 1
    source: SourceCoordinates
    event_id: str | None = Field(description="The event's id when it could be read.")
    key: bytes | None = Field(description="The original record key, base64url.")
    value: bytes = Field(description="The original record value, base64url.")
    headers: list[Header]
    error_kind: ErrorKind
    error_message: str
    attempts: int = Field(ge=1, description="How many times the event was tried.")
    failed_at: AwareDatetime
    worker_id: str = Field(description="host:pid of the worker that gave up.")
