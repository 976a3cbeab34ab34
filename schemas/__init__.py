"""Wire formats of the face-emotion worker: frame events in, results and dead letters out."""

from schemas.dead_letter import (
    HEADER_PREFIX,
    TRANSIENT_KINDS,
    DeadLetter,
    DeadLetterHeaders,
    ErrorKind,
    RecordHeader,
    original_headers,
)
from schemas.events import FaceBox, FrameEvent, SourceCoordinates
from schemas.results import (
    ClassifiedFace,
    EmotionResult,
    Face,
    FaceQuality,
    QualityFlag,
    ResultStatus,
    SkippedFace,
    result_id_for,
)
from schemas.summary import LabelSummary, WindowSummary

__all__ = [
    "HEADER_PREFIX",
    "TRANSIENT_KINDS",
    "ClassifiedFace",
    "DeadLetter",
    "DeadLetterHeaders",
    "EmotionResult",
    "ErrorKind",
    "Face",
    "FaceBox",
    "FaceQuality",
    "FrameEvent",
    "LabelSummary",
    "QualityFlag",
    "RecordHeader",
    "ResultStatus",
    "SkippedFace",
    "SourceCoordinates",
    "WindowSummary",
    "original_headers",
    "result_id_for",
]
