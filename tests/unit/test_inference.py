"""BatchRunner: failures stay with their event; running out of memory splits the batch.

A real CUDA out-of-memory cannot be produced on the CPU-only CI machines, so these tests
use a stand-in engine that raises torch.OutOfMemoryError above a batch size (the test
says so); everything else is the real code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from consumer.stream.batch_runner import BatchRunner
from consumer.stream.records import FailedEvent, InputRecord, PreparedEvent
from schemas import DeadLetter, EmotionResult, FaceBox, FrameEvent

LABELS = ("happy", "sad")


@dataclass
class Scores:
    label: str
    confidence: float
    scores: dict[str, float]


class StandInEngine:
    """Scores a face by its red value; raises OOM above `fits` faces, or on a poison face."""

    model_id = "stand-in"

    def __init__(self, fits: int = 1000) -> None:
        self.fits = fits
        self.calls: list[int] = []

    def classify(self, faces: Sequence[Image.Image]) -> list[Scores]:
        self.calls.append(len(faces))
        if len(faces) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        out = []
        for face in faces:
            red = face.getpixel((0, 0))[0]
            if red == 13:
                raise ValueError("poison face")
            p = red / 255
            out.append(
                Scores("happy" if p >= 0.5 else "sad", max(p, 1 - p), {"happy": p, "sad": 1 - p})
            )
        return out


def event(offset: int, reds: list[int]) -> PreparedEvent:
    record = InputRecord("frames", 0, offset, b"k", b"{}")
    frame = FrameEvent.model_validate_json(
        json.dumps(
            {
                "event_id": f"e{offset}",
                "stream_id": "s",
                "captured_at": "2026-01-01T00:00:00Z",
                "image": "file:///x.png",
            }
        )
    )
    crops = [Image.new("RGB", (4, 4), (r, 0, 0)) for r in reds]
    boxes = [FaceBox(x=0, y=0, width=4, height=4) for _ in reds]
    return PreparedEvent(record, frame, boxes, crops)


def runner(engine: StandInEngine) -> BatchRunner:
    return BatchRunner(engine, "emotions", "dead")


def test_one_engine_call_for_a_healthy_batch() -> None:
    engine = StandInEngine()
    outcomes = runner(engine).run([event(0, [255]), event(1, [0, 255])])
    assert engine.calls == [3]
    results = [EmotionResult.model_validate_json(o.value) for o in outcomes]
    assert [len(r.faces) for r in results] == [1, 2]
    assert [f.label for f in results[1].faces] == ["sad", "happy"]


def test_out_of_memory_splits_and_loses_nothing() -> None:
    engine = StandInEngine(fits=2)
    batch = [event(i, [255 if i % 2 else 0]) for i in range(7)]
    run = runner(engine)
    outcomes = run.run(batch)
    assert run.oom_splits >= 2
    # The first call held all 7 faces; in the end each face was scored once in a call that fit.
    assert engine.calls[0] == 7 and sum(c for c in engine.calls if c <= 2) == 7
    results = [EmotionResult.model_validate_json(o.value) for o in outcomes]
    assert [r.source.offset for r in results] == list(range(7))
    assert [r.faces[0].label for r in results] == ["sad", "happy"] * 3 + ["sad"]


def test_a_poison_face_becomes_that_events_dead_letter_only() -> None:
    engine = StandInEngine()
    batch = [event(0, [255]), event(1, [13]), event(2, [0])]
    outcomes = runner(engine).run(batch)
    assert [o.is_dead_letter for o in outcomes] == [False, True, False]
    letter = DeadLetter.from_record(outcomes[1].key, outcomes[1].value, outcomes[1].headers)
    assert letter.error_kind == "model_error" and "poison face" in letter.error_message
    assert EmotionResult.model_validate_json(outcomes[2].value).faces[0].label == "sad"


def test_a_single_face_that_never_fits_is_a_dead_letter() -> None:
    engine = StandInEngine(fits=0)
    outcomes = runner(engine).run([event(0, [255]), event(1, [0])])
    assert all(o.is_dead_letter for o in outcomes)
    first = outcomes[0]
    letter = DeadLetter.from_record(first.key, first.value, first.headers)
    assert "OutOfMemoryError" in letter.error_message


def test_failed_items_pass_through_in_order() -> None:
    failed = FailedEvent(InputRecord("frames", 0, 1, None, b"x"), "not_json", "bad")
    outcomes = runner(StandInEngine()).run([event(0, [255]), failed, event(2, [0])])
    assert [o.record.offset for o in outcomes] == [0, 1, 2]
    assert [o.is_dead_letter for o in outcomes] == [False, True, False]
