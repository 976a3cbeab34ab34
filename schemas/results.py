"""The result published for every frame event that could be read and decoded."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.events import FaceBox, SourceCoordinates

ResultStatus = Literal["ok", "no_face"]

# A fixed namespace makes result ids reproducible by any consumer from the coordinates.
_RESULT_NAMESPACE = uuid.UUID("5d0b3f0e-6a4c-4f55-9a57-2f5f8c1d7e21")


def result_id_for(source: SourceCoordinates) -> str:
    """Deterministic id of the result of one input record: redeliveries get the same id."""
    name = f"{source.topic}/{source.partition}/{source.offset}"
    return str(uuid.uuid5(_RESULT_NAMESPACE, name))


class FaceEmotion(BaseModel):
    """The emotion of one face."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    box: FaceBox = Field(description="The face's box in the image's pixel coordinates.")
    label: str = Field(description="The label with the highest score.")
    confidence: float = Field(ge=0, le=1, description="Score of the label.")
    scores: dict[str, float] = Field(description="Every label's probability; they sum to 1.")


class EmotionResult(BaseModel):
    """What the worker publishes for one frame event."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    result_id: str = Field(description="uuid5 of the source coordinates: equal for duplicates.")
    event_id: str
    stream_id: str
    source: SourceCoordinates
    captured_at: AwareDatetime
    processed_at: AwareDatetime
    model_id: str
    status: ResultStatus
    faces: list[FaceEmotion]
