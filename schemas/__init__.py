"""Wire formats of the face-emotion worker: frame events in, results and dead letters out."""

from schemas.dead_letter import DeadLetter, ErrorKind, Header
from schemas.events import FaceBox, FrameEvent, SourceCoordinates
from schemas.results import EmotionResult, FaceEmotion, ResultStatus, result_id_for

__all__ = [
    "DeadLetter",
    "EmotionResult",
    "ErrorKind",
    "FaceBox",
    "FaceEmotion",
    "FrameEvent",
    "Header",
    "ResultStatus",
    "SourceCoordinates",
    "result_id_for",
]
