"""Tumbling windows of capture time, per stream: pure values, no Kafka.

A result falls in the window `[start, start + length)` that holds its `captured_at`,
windows aligned to the epoch. Per stream the watermark is the latest `captured_at`
counted; a window closes when the watermark reaches its end plus the grace period, or
when the stream has been idle (the loop decides when, `close_idle`). Once a window is
closed, the stream remembers the end of its latest closed window: a result for a closed
window (late, or a duplicate of one already summarized) is dropped, never reopening it.
Within an open window, a result whose result_id was counted already is a duplicate and
dropped. Results dated too far after their own processing time are dropped as well: a
camera clock in the future would otherwise close every window of its stream at once.

Everything here is deterministic given the results in order, except which streams the
loop calls idle: the same input after a restart from the changelog gives the same windows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from consumer.config import SummarizeSettings
from consumer.summarize.results import ResultFacts, from_ms
from schemas import LabelSummary, WindowSummary

Outcome = Literal["counted", "duplicate", "late", "future"]
# resized: restored with another length than summarize.window_s now (it was changed).
CloseReason = Literal["watermark", "idle", "resized"]


@dataclass(frozen=True)
class WindowRules:
    length_ms: int
    grace_ms: int
    max_skew_ms: int

    @classmethod
    def from_settings(cls, settings: SummarizeSettings) -> WindowRules:
        return cls(
            length_ms=max(1, round(settings.window_s * 1000)),
            grace_ms=round(settings.grace_s * 1000),
            max_skew_ms=round(settings.max_clock_skew_s * 1000),
        )

    def start_of(self, captured_ms: int) -> int:
        return captured_ms - captured_ms % self.length_ms


@dataclass
class Window:
    """One open window's aggregate: the results counted so far and their faces."""

    start_ms: int
    length_ms: int
    result_ids: set[str] = field(default_factory=set)
    faces: int = 0
    classified: int = 0
    skipped: int = 0
    top_labels: dict[str, int] = field(default_factory=dict)  # faces each label topped
    score_sums: dict[str, float] = field(default_factory=dict)  # over classified faces
    confidence_sum: float = 0.0

    def add(self, result: ResultFacts) -> None:
        self.result_ids.add(result.result_id)
        for face in result.faces:
            self.faces += 1
            if face.label is None:
                self.skipped += 1
                continue
            self.classified += 1
            self.confidence_sum += face.confidence
            self.top_labels[face.label] = self.top_labels.get(face.label, 0) + 1
            for label, score in face.scores:
                self.score_sums[label] = self.score_sums.get(label, 0.0) + score

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.length_ms

    def summary(self, stream_id: str, closed_at: datetime) -> WindowSummary:
        n = self.classified
        labels = {
            label: LabelSummary(
                faces=self.top_labels.get(label, 0),
                mean_score=_share(self.score_sums.get(label, 0.0), n),
            )
            for label in sorted(self.score_sums.keys() | self.top_labels.keys())
        }
        return WindowSummary(
            stream_id=stream_id,
            window_start=from_ms(self.start_ms),
            window_end=from_ms(self.end_ms),
            results=len(self.result_ids),
            faces=self.faces,
            classified=n,
            skipped=self.skipped,
            skipped_share=_share(self.skipped, self.faces),
            labels=labels,
            mean_confidence=_share(self.confidence_sum, n) if n else None,
            closed_at=closed_at,
        )


def _share(part: float, whole: int) -> float:
    # A sum of scores <= 1 divided by their count is <= 1 in floats too; min() is a guard.
    return min(1.0, part / whole) if whole else 0.0


@dataclass
class StreamWindows:
    """One stream: its watermark, the end of its latest closed window, its open windows."""

    watermark_ms: int | None = None
    closed_until_ms: int | None = None
    open: dict[int, Window] = field(default_factory=dict)


@dataclass(frozen=True)
class Closed:
    stream_id: str
    window: Window
    reason: CloseReason


@dataclass(frozen=True)
class Changes:
    """What changed since the last `take_changes`: for the changelog."""

    windows: dict[tuple[str, int], Window | None]  # None: closed (a tombstone)
    streams: dict[str, StreamWindows]


class PartitionWindows:
    """The streams of one results partition (a stream's results all go to one partition)."""

    def __init__(self, rules: WindowRules, clock: Callable[[], float]) -> None:
        self.rules = rules
        self._clock = clock
        self.streams: dict[str, StreamWindows] = {}
        self.last_seen: dict[str, float] = {}  # clock() of each stream's latest result
        self._changed_windows: set[tuple[str, int]] = set()
        self._changed_streams: set[str] = set()

    def add(self, result: ResultFacts) -> tuple[Outcome, list[Closed]]:
        """Count one result (or say why not) and close the windows its time closes."""
        rules = self.rules
        stream_id = result.stream_id
        self.last_seen[stream_id] = self._clock()
        if result.captured_ms > result.processed_ms + rules.max_skew_ms:
            return "future", []
        stream = self.streams.setdefault(stream_id, StreamWindows())
        start = rules.start_of(result.captured_ms)
        end = start + rules.length_ms
        window = stream.open.get(start)
        if window is None:
            expired = (
                stream.watermark_ms is not None and end + rules.grace_ms <= stream.watermark_ms
            )
            # (Equal to `end <= closed_until` but across a change of window_s, where a new
            # window may straddle a closed one: its results are never counted twice.)
            closed = (
                stream.closed_until_ms is not None and result.captured_ms < stream.closed_until_ms
            )
            if expired or closed:
                return "late", []
            window = stream.open[start] = Window(start, rules.length_ms)
        elif result.result_id in window.result_ids:
            return "duplicate", []
        window.add(result)
        self._changed_windows.add((stream_id, start))
        if stream.watermark_ms is None or result.captured_ms > stream.watermark_ms:
            stream.watermark_ms = result.captured_ms
            self._changed_streams.add(stream_id)
        due = [
            s for s, w in stream.open.items() if w.end_ms + rules.grace_ms <= stream.watermark_ms
        ]
        return "counted", self._close(stream_id, sorted(due), "watermark")

    def close_idle(self, seen_before: float) -> list[Closed]:
        """Close every open window of the streams whose latest result came before then."""
        closed: list[Closed] = []
        for stream_id, stream in self.streams.items():
            if stream.open and self.last_seen.get(stream_id, seen_before) < seen_before:
                closed += self._close(stream_id, sorted(stream.open), "idle")
        return closed

    def _close(self, stream_id: str, starts: list[int], reason: CloseReason) -> list[Closed]:
        stream = self.streams[stream_id]
        closed = []
        for start in starts:
            window = stream.open.pop(start)
            closed.append(Closed(stream_id, window, reason))
            end = window.end_ms
            if stream.closed_until_ms is None or end > stream.closed_until_ms:
                stream.closed_until_ms = end
            self._changed_windows.add((stream_id, start))
            self._changed_streams.add(stream_id)
        return closed

    def open_windows(self) -> int:
        return sum(len(stream.open) for stream in self.streams.values())

    def take_changes(self) -> Changes:
        """The windows and streams changed since the last call; forgets them."""
        windows = {
            (stream_id, start): self.streams[stream_id].open.get(start)
            for stream_id, start in sorted(self._changed_windows)
        }
        streams = {
            stream_id: self.streams[stream_id] for stream_id in sorted(self._changed_streams)
        }
        self._changed_windows.clear()
        self._changed_streams.clear()
        return Changes(windows, streams)

    def restore_window(self, stream_id: str, window: Window) -> None:
        self.streams.setdefault(stream_id, StreamWindows()).open[window.start_ms] = window

    def restore_stream(
        self, stream_id: str, watermark_ms: int | None, closed_until_ms: int | None
    ) -> None:
        stream = self.streams.setdefault(stream_id, StreamWindows())
        stream.watermark_ms = watermark_ms
        stream.closed_until_ms = closed_until_ms

    def close_resized(self) -> list[Closed]:
        """Close the (restored) windows whose length is not the length now: summarize.window_s
        was changed. Their summaries say their own length; new windows start after them."""
        closed: list[Closed] = []
        for stream_id, stream in self.streams.items():
            old = sorted(s for s, w in stream.open.items() if w.length_ms != self.rules.length_ms)
            closed += self._close(stream_id, old, "resized")
        return closed

    def forget_window(self, stream_id: str, start_ms: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.open.pop(start_ms, None)

    def touch_all(self) -> None:
        """Every stream counts as just seen (after a restore: idleness starts now)."""
        now = self._clock()
        self.last_seen = dict.fromkeys(self.streams, now)
