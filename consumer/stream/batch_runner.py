"""The model step for one micro-batch: faces in, results and dead letters out, in order.

Failures stay with the event that caused them: running out of GPU memory splits the batch
and retries the halves (never dropping events), and any other model error is retried one
event at a time so that only the events that really fail become dead letters.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import structlog
import torch
from PIL import Image

from consumer.errors import EventError
from consumer.stream.records import FailedEvent, Item, Outcome, PreparedEvent
from consumer.stream.stages import ScoredFace, encode_dead_letter, encode_result

log = structlog.get_logger("consumer.stream.batch_runner")


class Classifier(Protocol):
    """What the pipeline needs of the model engine (consumer.engine.EmotionEngine)."""

    model_id: str

    def classify(self, faces: Sequence[Image.Image]) -> Sequence[ScoredFace]: ...


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


class BatchRunner:
    """Turns a batch of items into outcomes with one engine call when all goes well."""

    def __init__(
        self,
        engine: Classifier,
        output_topic: str,
        dead_letter_topic: str,
        include_payload: bool = True,
    ) -> None:
        self.engine = engine
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.include_payload = include_payload
        self.oom_splits = 0

    def run(self, batch: Sequence[Item]) -> list[Outcome]:
        """One outcome per item, in the batch's order."""
        prepared = [item for item in batch if isinstance(item, PreparedEvent)]
        started = time.perf_counter()
        scores = self._score_events(prepared)
        log.debug(
            "batch classified",
            events=len(batch),
            faces=sum(len(p.model_crops) for p in prepared),
            model_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        outcomes = []
        for item in batch:
            result = scores.get(id(item)) if isinstance(item, PreparedEvent) else None
            if isinstance(item, FailedEvent):
                outcomes.append(self._dead_letter(item))
            elif isinstance(result, BaseException):
                error = EventError("model_error", f"{type(result).__name__}: {result}")
                failed = FailedEvent.from_error(item.record, error, item.event, item.fetch_attempts)
                outcomes.append(self._dead_letter(failed))
            else:
                outcomes.append(
                    encode_result(item, result or [], self.engine.model_id, self.output_topic)
                )
        return outcomes

    def _dead_letter(self, failed: FailedEvent) -> Outcome:
        return encode_dead_letter(failed, self.dead_letter_topic, self.include_payload)

    def _score_events(
        self, events: list[PreparedEvent]
    ) -> dict[int, Sequence[ScoredFace] | BaseException]:
        """Scores per event (keyed by id), or the exception that event's faces raised.

        Only the faces to classify go to the engine: faces.min_quality's skipped ones cost
        no model time."""
        crops = [crop for event in events for crop in event.model_crops]
        if not crops:
            return {id(event): [] for event in events}
        try:
            flat = self._classify_splitting(crops)
        except Exception as exc:
            if len(events) == 1:
                return {id(events[0]): exc}
            log.warning("batch failed; retrying event by event", error=repr(exc))
            results: dict[int, Sequence[ScoredFace] | BaseException] = {}
            for event in events:
                results.update(self._score_events([event]))
            return results
        out: dict[int, Sequence[ScoredFace] | BaseException] = {}
        cursor = 0
        for event in events:
            count = len(event.model_crops)
            out[id(event)] = flat[cursor : cursor + count]
            cursor += count
        return out

    def _classify_splitting(self, crops: list[Image.Image]) -> list[ScoredFace]:
        try:
            return list(self.engine.classify(crops))
        except Exception as exc:
            if not is_out_of_memory(exc) or len(crops) == 1:
                raise
        # Out of memory: free the cache and try the halves; one face that still does not
        # fit ends as that event's dead letter.
        self.oom_splits += 1
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(crops) // 2
        log.warning("out of GPU memory; splitting the batch", faces=len(crops))
        return self._classify_splitting(crops[:half]) + self._classify_splitting(crops[half:])
