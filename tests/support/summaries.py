"""Window summaries made by hand: the dashboard's tests never need the summarizer."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from consumer.config import FER_LABELS
from schemas.summary import LabelSummary, WindowSummary


def window_summary(
    stream: str,
    start: datetime,
    counts: dict[str, int],
    skipped: int = 0,
    seconds: float = 10.0,
    closed_at: datetime | None = None,
) -> WindowSummary:
    """The summary of one window: `counts` classified faces per top label, plus `skipped`."""
    classified = sum(counts.values())
    faces = classified + skipped
    end = start + timedelta(seconds=seconds)
    return WindowSummary(
        stream_id=stream,
        window_start=start,
        window_end=end,
        results=max(1, faces // 2) if faces else 0,
        faces=faces,
        classified=classified,
        skipped=skipped,
        skipped_share=skipped / faces if faces else 0.0,
        labels={
            label: LabelSummary(faces=counts.get(label, 0), mean_score=0.5 if classified else 0.0)
            for label in FER_LABELS
        },
        mean_confidence=0.6 if classified else None,
        closed_at=closed_at or end + timedelta(seconds=2),
    )


def random_summary(
    rng: random.Random, stream: str, start: datetime, closed_at: datetime | None = None
) -> WindowSummary:
    """A window with a few faces of random labels and sometimes skipped ones."""
    counts = {label: rng.randint(0, 4) for label in FER_LABELS}
    return window_summary(stream, start, counts, skipped=rng.randint(0, 2), closed_at=closed_at)
