"""The per-stream window summary that `emotion-worker summarize` publishes for dashboards."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelSummary(_Out):
    """One label within a window."""

    faces: int = Field(ge=0, description="Classified faces whose top label this is.")
    mean_score: float = Field(
        ge=0, le=1, description="Mean of this label's score over all classified faces."
    )


class WindowSummary(_Out):
    """What one stream's faces showed during one tumbling window of capture time.

    Windows are by `captured_at` (the camera's clock), `[window_start, window_end)`; a
    window is published once, when it closes: `summarize.grace_s` after a later result of
    the stream showed that time had passed, or when the stream stayed silent that long.
    """

    schema_version: Literal[1] = 1
    stream_id: str
    window_start: AwareDatetime
    window_end: AwareDatetime
    results: int = Field(ge=0, description="Distinct results (frames) in the window.")
    faces: int = Field(ge=0, description="Faces in those results, skipped ones included.")
    classified: int = Field(ge=0, description="Faces the model judged.")
    skipped: int = Field(ge=0, description="Faces skipped for quality (faces.min_quality).")
    skipped_share: float = Field(ge=0, le=1, description="skipped / faces; 0 without faces.")
    labels: dict[str, LabelSummary] = Field(
        description="Per label: how many classified faces it topped, and its mean score."
    )
    mean_confidence: float | None = Field(
        ge=0, le=1, description="Mean confidence of the classified faces; null without any."
    )
    closed_at: AwareDatetime = Field(description="When the summarizer closed the window.")
