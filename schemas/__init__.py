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
from schemas.results import EmotionResult, FaceEmotion, ResultStatus, result_id_for

__all__ = [
    "HEADER_PREFIX",
    "TRANSIENT_KINDS",
    "DeadLetter",
    "DeadLetterHeaders",
    "EmotionResult",
    "ErrorKind",
    "FaceBox",
    "FaceEmotion",
    "FrameEvent",
    "RecordHeader",
    "ResultStatus",
    "SourceCoordinates",
    "original_headers",
    "result_id_for",
]
