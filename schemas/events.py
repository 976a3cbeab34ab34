"""The frame event that upstream systems publish, one per video frame or photo."""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1
IMAGE_SCHEMES = ("s3", "file", "http", "https", "data")
# S3 bucket naming rules (lower case, digits, dots, hyphens; 3 to 63 characters).
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Longest URL; data: URIs may be longer, up to MAX_DATA_URI_CHARS (and flow.max_event_bytes).
MAX_URL_CHARS = 4096
MAX_DATA_URI_CHARS = 2_000_000
MAX_FACES_PER_EVENT = 64

Identifier = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")]


class _Strict(BaseModel):
    # strict: "12" is not an int and 1.0 is not a str; extra: a misspelt field is an error,
    # not a silently ignored one.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class FaceBox(_Strict):
    """A face's box in pixel coordinates of the full image: top-left corner and size."""

    x: int = Field(ge=0, le=100_000)
    y: int = Field(ge=0, le=100_000)
    width: int = Field(gt=0, le=100_000)
    height: int = Field(gt=0, le=100_000)


class SourceCoordinates(_Strict):
    """Where an event was read: results and dead letters point back at it."""

    topic: str = Field(min_length=1, max_length=249)
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class FrameEvent(_Strict):
    """One frame or photo to classify."""

    schema_version: Literal[1] = Field(
        default=1, description="Version of this schema; only 1 exists."
    )
    event_id: Identifier = Field(description="Unique id of this event, chosen upstream.")
    stream_id: Identifier = Field(
        description="Camera or video the frame belongs to; results are keyed by it."
    )
    captured_at: AwareDatetime = Field(
        description="When the frame was captured, ISO 8601 with a time zone."
    )
    image: str = Field(
        min_length=1,
        max_length=MAX_DATA_URI_CHARS,
        description=(
            "URI of the image: s3://bucket/key, https://..., http://..., file:///abs/path"
            " (at most 4096 characters) or data:image/...;base64,... (bounded by the"
            " event-size cap)"
        ),
    )
    faces: list[FaceBox] | None = Field(
        default=None,
        max_length=MAX_FACES_PER_EVENT,
        description="Face boxes found upstream; absent means the whole image is one face.",
    )

    @field_validator("image")
    @classmethod
    def _check_image_uri(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in IMAGE_SCHEMES:
            raise ValueError(
                f"scheme {parts.scheme or '(none)'!r} is not supported; use one of "
                + ", ".join("data:" if s == "data" else f"{s}://" for s in IMAGE_SCHEMES)
            )
        if parts.scheme == "data":
            if "," not in value:
                raise ValueError("a data URI must be data:<type>;base64,<data>")
            return value
        if len(value) > MAX_URL_CHARS:
            raise ValueError(f"a {parts.scheme} URI may be at most {MAX_URL_CHARS} characters")
        if parts.scheme == "file" and (parts.netloc not in ("", "localhost") or not parts.path):
            raise ValueError("a file URI must be file:///absolute/path (no host)")
        if parts.scheme == "s3":
            if not _S3_BUCKET.fullmatch(parts.netloc):
                raise ValueError(
                    f"s3 bucket {parts.netloc!r} is not a valid bucket name (3-63 characters:"
                    " lower-case letters, digits, dots, hyphens); use s3://bucket/key"
                )
            if len(parts.path) < 2 or parts.query or parts.fragment:
                raise ValueError("an s3 URI must be s3://bucket/key with a non-empty key")
        if parts.scheme in ("http", "https") and not parts.hostname:
            raise ValueError("an http(s) URI needs a host")
        return value

    @field_validator("faces")
    @classmethod
    def _check_faces(cls, value: list[FaceBox] | None) -> list[FaceBox] | None:
        if value is not None and len(value) == 0:
            raise ValueError("faces is an empty list; leave it out to classify the whole image")
        return value
