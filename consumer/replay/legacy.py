"""Dead letters written by 0.3.x and earlier: a JSON envelope (schema_version 1).

They still sit in dead-letter topics after an upgrade, and their causes may be fixed
later: replay reads them as well, as the letters they describe. Nothing writes them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from schemas import DeadLetter, ErrorKind, SourceCoordinates

# The envelope carried raw bytes as URL-safe base64, as pydantic wrote them.
_BASE64 = ConfigDict(extra="forbid", frozen=True, val_json_bytes="base64")


class _HeaderV1(BaseModel):
    model_config = _BASE64
    key: str
    value: bytes | None


class _EnvelopeV1(BaseModel):
    model_config = _BASE64
    schema_version: Literal[1]
    source: SourceCoordinates
    event_id: str | None
    key: bytes | None
    value: bytes
    headers: list[_HeaderV1]
    error_kind: ErrorKind
    error_message: str
    attempts: int
    failed_at: AwareDatetime
    worker_id: str


def from_envelope(value: bytes) -> DeadLetter | None:
    """The letter in a 0.3.x envelope, or None if `value` is not one."""
    try:
        old = _EnvelopeV1.model_validate_json(value)
    except ValidationError:
        return None
    return DeadLetter(
        error_kind=old.error_kind,
        error_message=old.error_message,
        source_topic=old.source.topic,
        source_partition=old.source.partition,
        source_offset=old.source.offset,
        event_id=old.event_id,
        attempts=old.attempts,
        failed_at=old.failed_at,
        worker_id=old.worker_id,
        payload="kept",
        key=old.key,
        value=old.value,
        headers=[(h.key, h.value) for h in old.headers],
    )
