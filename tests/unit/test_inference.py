"""BatchRunner: failures stay with their event; running out of memory splits the batch.

A real CUDA out-of-memory cannot be produced on the CPU-only CI machines, so these tests
use a stand-in engine that raises torch.OutOfMemoryError above a batch size (the test
says so); everything else is the real code. Faces under faces.min_quality never reach
the engine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from consumer.config import FaceSettings
from consumer.decode.decoding import Cropped
from consumer.stream.batch_runner import BatchRunner
from consumer.stream.batching import face_count
from consumer.stream.records import FailedEvent, InputRecord, PreparedEvent
from consumer.stream.stages import assess_faces
from schemas import ClassifiedFace, DeadLetter, EmotionResult, FaceBox, FrameEvent, SkippedFace
from tests.conftest import FER_FACES

LABELS = ("happy", "sad")
# A real FER face (quality score 1): the red of its top-left pixel is what the stand-in reads.
GOOD_FACE = Image.open(sorted((FER_FACES / "happy").glob("*.png"))[0]).convert("RGB")


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


def face(red: int, side: int | None = None) -> Image.Image:
    """A FER face with its top-left pixel's red set; `side` shrinks it (a low-quality face)."""
    crop = GOOD_FACE.copy()
    if side is not None:
        crop = crop.resize((side, side))
    crop.putpixel((0, 0), (red, 0, 0))
    return crop


def event(
    offset: int, reds: list[int], small: tuple[int, ...] = (), min_quality: float | None = None
) -> PreparedEvent:
    """An event with a face per red; the faces at the indexes in `small` are 12 px."""
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
    crops = [face(r, 12 if i in small else None) for i, r in enumerate(reds)]
    boxes = [FaceBox(x=i * 50, y=0, width=c.width, height=c.height) for i, c in enumerate(crops)]
    faces = FaceSettings(min_quality=min_quality)
    return assess_faces(record, frame, Cropped(boxes, crops, "event"), faces)


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


def test_faces_under_min_quality_never_reach_the_engine() -> None:
    engine = StandInEngine()
    batch = [
        event(0, [255, 0], small=(1,), min_quality=0.5),  # one face kept, one skipped
        event(1, [0], small=(0,), min_quality=0.5),  # every face skipped
        event(2, [0], min_quality=0.5),
    ]
    assert [face_count(item) for item in batch] == [1, 0, 1]  # what micro-batching counts
    outcomes = runner(engine).run(batch)
    assert engine.calls == [2]  # the two kept faces, in one call
    results = [EmotionResult.model_validate_json(o.value) for o in outcomes]
    assert [r.status for r in results] == ["ok", "skipped", "ok"]
    kept, skipped = results[0].faces
    assert isinstance(kept, ClassifiedFace) and kept.label == "happy"
    assert isinstance(skipped, SkippedFace) and skipped.box.x == 50  # box order kept
    assert skipped.reason.startswith(f"quality {skipped.quality.score:.3g} < faces.min_quality")
    assert "0.5 (small, blurry)" in skipped.reason
    assert skipped.quality.flags == ["small", "blurry"] and skipped.quality.width == 12
    assert isinstance(results[2].faces[0], ClassifiedFace) and results[2].faces[0].label == "sad"
    # The ops metrics count labels of classified faces only.
    assert [o.face_labels for o in outcomes] == [("happy",), (), ("sad",)]


def test_a_batch_of_only_skipped_faces_makes_no_engine_call() -> None:
    engine = StandInEngine()
    outcomes = runner(engine).run([event(0, [255, 0], small=(0, 1), min_quality=0.5)])
    assert engine.calls == []
    result = EmotionResult.model_validate_json(outcomes[0].value)
    assert result.status == "skipped" and [f.status for f in result.faces] == ["skipped"] * 2


def test_without_min_quality_low_quality_faces_are_classified_and_flagged() -> None:
    engine = StandInEngine()
    outcomes = runner(engine).run([event(0, [255, 0], small=(1,))])
    assert engine.calls == [2]
    tiny = EmotionResult.model_validate_json(outcomes[0].value).faces[1]
    assert isinstance(tiny, ClassifiedFace) and tiny.label == "sad"
    assert "small" in tiny.quality.flags and tiny.quality.score < 0.5
