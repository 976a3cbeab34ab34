"""Emotion results (schema 2) for the summarizer's tests, built directly: no worker needed.

`expected_windows` is the summarizer's arithmetic done the plain way, over the distinct
results, to compare its summaries with.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from consumer.config import FER_LABELS
from schemas import (
    ClassifiedFace,
    EmotionResult,
    FaceBox,
    FaceQuality,
    SkippedFace,
    SourceCoordinates,
    WindowSummary,
    result_id_for,
)

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)  # a window boundary for any whole-second length
_BOX = FaceBox(x=0, y=0, width=48, height=48)
_QUALITY = FaceQuality(
    width=48,
    height=48,
    sharpness=120.0,
    brightness=0.5,
    contrast=0.4,
    vouched_by="event",
    score=1.0,
    flags=[],
)


def classified(label: str, confidence: float = 0.7) -> ClassifiedFace:
    """A face whose top label is `label`; the other labels share the rest of the score."""
    others = [name for name in FER_LABELS if name != label]
    rest = (1.0 - confidence) / len(others)
    scores = {name: (confidence if name == label else rest) for name in FER_LABELS}
    return ClassifiedFace(
        box=_BOX, quality=_QUALITY, label=label, confidence=confidence, scores=scores
    )


def skipped() -> SkippedFace:
    return SkippedFace(box=_BOX, quality=_QUALITY, reason="quality 0.31 < faces.min_quality 0.5")


def result(
    stream_id: str,
    at_s: float,
    offset: int,
    faces: list[ClassifiedFace | SkippedFace],
    frames_topic: str = "frames",
) -> EmotionResult:
    """The result of frame `offset` of `frames_topic`, captured `at_s` seconds after T0."""
    source = SourceCoordinates(topic=frames_topic, partition=0, offset=offset)
    captured = T0 + timedelta(seconds=at_s)
    classified_faces = [f for f in faces if isinstance(f, ClassifiedFace)]
    status = "ok" if classified_faces else ("skipped" if faces else "no_face")
    return EmotionResult(
        result_id=result_id_for(source),
        event_id=f"{stream_id}-{offset}",
        stream_id=stream_id,
        source=source,
        captured_at=captured,
        processed_at=captured + timedelta(seconds=1),
        model_id="test-model",
        status=status,
        faces=faces,
    )


def record(res: EmotionResult) -> tuple[bytes, bytes]:
    """(key, value) as the worker publishes it: keyed by stream_id."""
    return res.stream_id.encode(), res.model_dump_json().encode()


@dataclass(frozen=True)
class Expected:
    results: int
    faces: int
    classified: int
    skipped: int
    top: dict[str, int]
    mean_scores: dict[str, float]
    mean_confidence: float | None


def expected_windows(
    results: list[EmotionResult], window_s: float
) -> dict[tuple[str, datetime], Expected]:
    """(stream_id, window_start) -> what its summary must say, over distinct result ids."""
    distinct = {r.result_id: r for r in results}
    grouped: dict[tuple[str, datetime], list[EmotionResult]] = defaultdict(list)
    length = timedelta(seconds=window_s)
    for r in distinct.values():
        start = T0 + ((r.captured_at - T0) // length) * length
        grouped[(r.stream_id, start)].append(r)
    out = {}
    for key, members in grouped.items():
        faces = [f for r in members for f in r.faces]
        judged = [f for f in faces if isinstance(f, ClassifiedFace)]
        top: dict[str, int] = defaultdict(int)
        for f in judged:
            top[f.label] += 1
        labels = sorted({name for f in judged for name in f.scores})
        out[key] = Expected(
            results=len(members),
            faces=len(faces),
            classified=len(judged),
            skipped=len(faces) - len(judged),
            top=dict(top),
            mean_scores={n: sum(f.scores[n] for f in judged) / len(judged) for n in labels},
            mean_confidence=sum(f.confidence for f in judged) / len(judged) if judged else None,
        )
    return out


def check_summary(summary: WindowSummary, expected: Expected) -> None:
    """Counts exactly equal, means equal up to float rounding."""
    assert (summary.results, summary.faces, summary.classified, summary.skipped) == (
        expected.results,
        expected.faces,
        expected.classified,
        expected.skipped,
    ), (summary, expected)
    assert {k: v.faces for k, v in summary.labels.items() if v.faces} == expected.top
    assert set(summary.labels) == set(expected.mean_scores)
    for name, mean in expected.mean_scores.items():
        assert abs(summary.labels[name].mean_score - mean) < 1e-9, name
    if expected.mean_confidence is None:
        assert summary.mean_confidence is None
    else:
        assert summary.mean_confidence is not None
        assert abs(summary.mean_confidence - expected.mean_confidence) < 1e-9
    share = expected.skipped / expected.faces if expected.faces else 0.0
    assert abs(summary.skipped_share - share) < 1e-12
