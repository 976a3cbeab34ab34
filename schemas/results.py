"""The result published for every frame event that could be read and decoded.

Version 2 (0.4.0) gives every face a quality measure and lets a face be skipped for low
quality instead of classified; schemas/emotion_result.v1.schema.json keeps version 1.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.events import FaceBox, SourceCoordinates

# ok: at least one face classified; no_face: no face in the image (none found, or the
# detector is off and the image is empty); skipped: faces found, every one skipped.
ResultStatus = Literal["ok", "no_face", "skipped"]

QualityFlag = Literal[
    "small",  # shorter side under faces.min_face_px: little expression left to read
    "blurry",  # low sharpness (variance of the Laplacian)
    "dark",  # low mean brightness
    "overexposed",  # high mean brightness or many saturated pixels
    # faces.verify_whole_image checked a whole image (faces.detector = none) and the Haar
    # cascade found no face in it. vouched_by "none" alone is not it: pre-cropped input
    # has no detector, by design.
    "no_face_found",
]

# A fixed namespace makes result ids reproducible by any consumer from the coordinates.
_RESULT_NAMESPACE = uuid.UUID("5d0b3f0e-6a4c-4f55-9a57-2f5f8c1d7e21")


def result_id_for(source: SourceCoordinates) -> str:
    """Deterministic id of the result of one input record: redeliveries get the same id."""
    name = f"{source.topic}/{source.partition}/{source.offset}"
    return str(uuid.uuid5(_RESULT_NAMESPACE, name))


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FaceQuality(_Out):
    """How well the model can judge this face: measures, a score and the flags behind it.

    Every measure is taken on the crop in grey scaled to 48x48. The score is the smallest
    of the flags' factors (each falls from 1 at its threshold to 0 at the worst value), 1
    when nothing is flagged (no_face_found: at most 0.4).
    """

    width: int = Field(gt=0, description="Width of the face's crop, pixels.")
    height: int = Field(gt=0, description="Height of the face's crop, pixels.")
    sharpness: float = Field(
        ge=0,
        description=(
            "Variance of the Laplacian of the crop in grey, scaled to 48x48 (FER's size) so "
            "faces of any size compare; higher is sharper."
        ),
    )
    brightness: float = Field(ge=0, le=1, description="Mean grey level, 0 black to 1 white.")
    contrast: float = Field(
        ge=0, le=1, description="Standard deviation of the grey levels, as a share of 0.5."
    )
    vouched_by: Literal["event", "detector", "none"] = Field(
        description=(
            "Who said a face is there: the event's box, the face detector, or nobody (the "
            "whole image taken as the face, faces.detector = none)."
        )
    )
    score: float = Field(ge=0, le=1, description="1 = no doubt; each flag lowers it.")
    flags: list[QualityFlag] = Field(description="What lowered the score, if anything.")


class ClassifiedFace(_Out):
    """A face the model judged."""

    status: Literal["classified"] = "classified"
    box: FaceBox = Field(description="The face's box in the image's pixel coordinates.")
    quality: FaceQuality
    label: str = Field(description="The label with the highest score.")
    confidence: float = Field(ge=0, le=1, description="Score of the label.")
    scores: dict[str, float] = Field(description="Every label's probability; they sum to 1.")


class SkippedFace(_Out):
    """A face under faces.min_quality: not classified, so it has no label and no scores."""

    status: Literal["skipped"] = "skipped"
    box: FaceBox = Field(description="The face's box in the image's pixel coordinates.")
    quality: FaceQuality
    reason: str = Field(description="Why, e.g. 'quality 0.31 < faces.min_quality 0.5'.")


Face = Annotated[ClassifiedFace | SkippedFace, Field(discriminator="status")]


class EmotionResult(_Out):
    """What the worker publishes for one frame event."""

    schema_version: Literal[2] = 2
    result_id: str = Field(description="uuid5 of the source coordinates: equal for duplicates.")
    event_id: str
    stream_id: str
    source: SourceCoordinates
    captured_at: AwareDatetime
    processed_at: AwareDatetime
    model_id: str
    status: ResultStatus
    faces: list[Face]
