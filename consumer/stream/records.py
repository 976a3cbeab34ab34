"""Plain values that flow between the stages; Kafka objects stay in kafka_io."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from PIL import Image

from consumer.errors import EventError
from schemas import ErrorKind, FaceBox, FaceQuality, FrameEvent, SourceCoordinates


@dataclass(frozen=True, slots=True)
class InputRecord:
    """One consumed Kafka record, copied out of the client's message object."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes | None], ...] = ()
    timestamp_ms: int | None = None
    read_at: float = 0.0  # time.monotonic() when the worker read it (queue-wait metric)

    @property
    def source(self) -> SourceCoordinates:
        return SourceCoordinates(topic=self.topic, partition=self.partition, offset=self.offset)

    @property
    def topic_partition(self) -> tuple[str, int]:
        return (self.topic, self.partition)


@dataclass(slots=True)
class PreparedEvent:
    """A valid event whose image was fetched and decoded, with one RGB crop per face.

    `quality` has one entry per face (box order); `skip_reasons` maps the index of each
    face under faces.min_quality to why it is skipped. Only `model_crops` go to the model.
    """

    record: InputRecord
    event: FrameEvent
    boxes: list[FaceBox]
    crops: list[Image.Image]
    fetch_attempts: int = 1
    quality: list[FaceQuality] = field(default_factory=list)
    skip_reasons: dict[int, str] = field(default_factory=dict)

    @property
    def model_crops(self) -> list[Image.Image]:
        """The crops of the faces to classify, in box order (skipped faces left out)."""
        if not self.skip_reasons:
            return self.crops
        return [c for i, c in enumerate(self.crops) if i not in self.skip_reasons]


@dataclass(frozen=True, slots=True)
class FailedEvent:
    """A record that becomes a dead letter."""

    record: InputRecord
    kind: ErrorKind
    message: str
    fetch_attempts: int = 1
    event_id: str | None = None
    stream_id: str | None = None

    @classmethod
    def from_error(
        cls,
        record: InputRecord,
        error: EventError,
        event: FrameEvent | None = None,
        fetch_attempts: int = 1,
    ) -> FailedEvent:
        """The dead letter-to-be of an event that failed with `error` (the one way to make
        one). `event` is None when the record did not parse."""
        return cls(
            record,
            error.kind,
            error.message,
            max(fetch_attempts, error.attempts),
            event.event_id if event is not None else None,
            event.stream_id if event is not None else None,
        )


# What the fetch stage hands on and the micro-batcher groups: ready for the model or failed.
Item = PreparedEvent | FailedEvent


@dataclass(slots=True)
class Outcome:
    """What to publish for one record: a result or a dead letter, as JSON bytes."""

    record: InputRecord
    topic: str
    key: bytes | None
    value: bytes
    is_dead_letter: bool
    headers: list[tuple[str, str | bytes | None]] = field(default_factory=list)
    event_id: str | None = None
    reason: str | None = None  # dead letters: "<error_kind>: <message>", for the log
    label: str = ""  # results: the status (ok, no_face, skipped); dead letters: the error kind
    stream_id: str | None = None  # for the log; None when the event could not be parsed
    captured_at: datetime | None = None  # the event's, for the end-to-end latency metric
    face_labels: tuple[str, ...] = ()  # results: each face's predicted label (faces metric)
