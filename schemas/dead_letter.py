"""The dead letter published for an input record that cannot become a result.

A dead letter is the input record itself, as it was: the same key, the same value bytes
and the same headers, so that any Kafka tool (kcat, kafka-console-producer, Connect, our
own `emotion-worker replay`) can put it back on the input topic unchanged. Why it failed
and where it came from travel in headers of the worker's own, named `emotion.*` the way
Kafka Connect's dead-letter queues use `__connect.errors.*`:

    emotion.dead_letter.version   "2"
    emotion.error.kind            one of ErrorKind (invalid_event, image_fetch_failed, ...)
    emotion.error.message         what was wrong and how to fix it
    emotion.source.topic          the input record's topic,
    emotion.source.partition      partition (decimal)
    emotion.source.offset         and offset (decimal)
    emotion.event.id              the event's id, when the value could be read as an event
    emotion.attempts              how many times the event was tried (decimal)
    emotion.failed.at             when the worker gave up (ISO 8601, UTC)
    emotion.worker.id             host:pid of that worker
    emotion.payload               "kept", or "omitted" when dead_letter.include_payload is
                                  off (the value is then empty)

Header values are UTF-8 text. The `emotion.` prefix belongs to the worker: an input
header under it is not copied to the dead letter (it could pose as the worker's verdict),
and `replay` strips the worker's headers before republishing.
`DeadLetter.from_record` reads a dead letter back, naming any header that is missing or
wrong; `schemas/dead_letter.schema.json` documents the headers (`DeadLetterHeaders`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

from pydantic import AliasGenerator, AwareDatetime, BaseModel, ConfigDict, Field

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

# Kinds whose cause can go away (a server back up, an image uploaded late, a GPU that ran
# out of memory): `emotion-worker replay` republishes these unless told otherwise. Every
# other kind fails the same way each time for the same bytes and config (a bad event, an
# undecodable image, a refused URL), so it is replayed only when named: replaying it by
# default would only send it round the dead-letter topic again.
TRANSIENT_KINDS: tuple[ErrorKind, ...] = ("image_fetch_failed", "image_not_found", "model_error")

# Headers under this prefix are the worker's (see the module docstring).
HEADER_PREFIX = "emotion."
DEAD_LETTER_VERSION: Final = "2"

# A Kafka record header: a name and raw bytes (or None). confluent-kafka may also hand
# over (and accepts) str values, which are their UTF-8 bytes.
RecordHeader = tuple[str, bytes | None]
AnyHeader = tuple[str, str | bytes | None]

# DeadLetterHeaders' fields and the headers they travel in.
HEADER_NAMES = {
    "version": "emotion.dead_letter.version",
    "error_kind": "emotion.error.kind",
    "error_message": "emotion.error.message",
    "source_topic": "emotion.source.topic",
    "source_partition": "emotion.source.partition",
    "source_offset": "emotion.source.offset",
    "event_id": "emotion.event.id",
    "attempts": "emotion.attempts",
    "failed_at": "emotion.failed.at",
    "worker_id": "emotion.worker.id",
    "payload": "emotion.payload",
}


def _header(field: str) -> str:
    # DeadLetter's own fields (key, value, headers) are not headers: no alias.
    return HEADER_NAMES.get(field, field)


def _headers_are_text(schema: dict[str, Any]) -> None:
    """Numbers travel as decimal text in headers: say so in the JSON Schema."""
    for prop in schema.get("properties", {}).values():
        if prop.get("type") == "integer":
            positive = prop.pop("minimum", 0) >= 1
            prop.update(type="string", pattern="^[1-9][0-9]*$" if positive else "^[0-9]+$")
        if {"type": "null"} in prop.get("anyOf", ()):  # optional: the header is absent
            (prop["type"],) = (t["type"] for t in prop.pop("anyOf") if t["type"] != "null")
            prop.pop("default", None)
        prop.pop("title", None)


class DeadLetterHeaders(BaseModel):
    """The `emotion.*` headers of a dead letter: why the record failed, and where it was read.

    The dead letter's key, value and other headers are the input record's, unchanged.
    Every header value is UTF-8 text; numbers are decimal.
    """

    # Read and written under the header names; built from the field names in code.
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=AliasGenerator(validation_alias=_header, serialization_alias=_header),
        validate_by_name=True,
        json_schema_extra=_headers_are_text,
    )

    version: Literal["2"] = Field(
        default=DEAD_LETTER_VERSION,
        description="Version of this header layout (1 was a JSON envelope, before 0.4.0).",
    )
    error_kind: ErrorKind
    error_message: str = Field(description="What was wrong and how to fix it.")
    source_topic: str = Field(min_length=1, max_length=249)
    source_partition: int = Field(ge=0)
    source_offset: int = Field(ge=0)
    event_id: str | None = Field(
        default=None,
        description="The event's id; the header is absent when the value is not an event.",
    )
    attempts: int = Field(ge=1, description="How many times the event was tried.")
    failed_at: AwareDatetime
    worker_id: str = Field(description="host:pid of the worker that gave up.")
    payload: Literal["kept", "omitted"] = Field(
        description=(
            "`kept`: the value is the input record's value; `omitted`: it is empty "
            "(dead_letter.include_payload = false)."
        ),
    )

    @property
    def source(self) -> SourceCoordinates:
        return SourceCoordinates(
            topic=self.source_topic, partition=self.source_partition, offset=self.source_offset
        )

    def encode(self) -> list[tuple[str, bytes]]:
        """The headers, in field order, with UTF-8 values (absent when None)."""
        fields = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return [(name, str(value).encode()) for name, value in fields.items()]


class DeadLetter(DeadLetterHeaders):
    """A dead letter read back: the worker's headers plus the original record's parts."""

    # Validation only: the record's own parts are not headers and have no alias.
    key: bytes | None = Field(description="The original record key.")
    value: bytes = Field(description="The original record value (empty when omitted).")
    headers: list[RecordHeader] = Field(
        description="The original record's headers, in order, without `emotion.*` ones."
    )

    @classmethod
    def from_record(
        cls, key: bytes | None, value: bytes | None, headers: Sequence[AnyHeader] | None
    ) -> DeadLetter:
        """Read a dead-letter record; a pydantic ValidationError names a bad or missing header.

        A header the worker writes twice is an error too: the record was not written by a
        worker of this version (or was tampered with).
        """
        ours: dict[str, str] = {}
        original: list[RecordHeader] = []
        for name, raw in headers or ():
            data = raw.encode() if isinstance(raw, str) else raw
            if not name.startswith(HEADER_PREFIX):
                original.append((name, data))
                continue
            if name in ours:
                raise ValueError(f"dead-letter header {name} appears twice")
            ours[name] = (data or b"").decode("utf-8", errors="replace")
        why = DeadLetterHeaders.model_validate(ours)
        return cls(**dict(why), key=key, value=value or b"", headers=original)


def original_headers(headers: Sequence[RecordHeader] | None) -> list[RecordHeader]:
    """The headers of a record without the worker's `emotion.*` ones, in order."""
    return [(name, raw) for name, raw in headers or () if not name.startswith(HEADER_PREFIX)]
