"""The window summaries the page shows: per stream, the last minutes, bounded in memory."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from schemas.summary import WindowSummary

# Per stream, whatever the window length: 10 minutes of 1-second windows. Memory stays
# bounded (about max_streams x 600 x 1 KB) even for a summarizer with tiny windows.
MAX_WINDOWS_PER_STREAM = 600


class SummaryStore:
    """Window summaries per stream: the newest `history` of each stream, by window time.

    The horizon is each stream's own newest `window_end`, not the wall clock: windows are in
    camera time, and a camera whose clock is off (or a replayed recording) still shows its
    last minutes. A later record of a window that is already held replaces it when it was
    closed at the same time or later (the summarizer publishing a window again), never
    when it is older (a replayed copy). At most `max_streams` streams: beyond that the
    stream whose newest window is the oldest is dropped. Not thread-safe (LiveSummaries
    holds the lock).
    """

    def __init__(
        self,
        history: timedelta,
        max_streams: int,
        max_windows: int = MAX_WINDOWS_PER_STREAM,
    ) -> None:
        if history <= timedelta(0) or max_streams < 1 or max_windows < 1:
            raise ValueError("history, max_streams and max_windows must be positive")
        self.history = history
        self.max_streams = max_streams
        self.max_windows = max_windows
        self._streams: dict[str, dict[datetime, WindowSummary]] = {}
        self._newest: dict[str, datetime] = {}  # per stream, its newest window_end

    def add(self, summary: WindowSummary) -> bool:
        """Keep `summary`; False when it changes nothing (stale, older or a duplicate)."""
        stream = summary.stream_id
        windows = self._streams.get(stream)
        if windows is not None:
            if summary.window_end <= self._newest[stream] - self.history:
                return False  # older than what the stream shows
            held = windows.get(summary.window_start)
            if held is not None and (held == summary or held.closed_at > summary.closed_at):
                return False
        else:
            windows = self._streams[stream] = {}
        windows[summary.window_start] = summary
        newest = max(self._newest.get(stream, summary.window_end), summary.window_end)
        self._newest[stream] = newest
        self._prune(stream, newest)
        if len(self._streams) > self.max_streams:
            dropped = min(self._newest, key=lambda name: (self._newest[name], name))
            del self._streams[dropped], self._newest[dropped]
            return dropped != stream
        return True

    def _prune(self, stream: str, newest: datetime) -> None:
        windows = self._streams[stream]
        horizon = newest - self.history
        for start in [s for s, w in windows.items() if w.window_end <= horizon]:
            del windows[start]
        if len(windows) > self.max_windows:
            for start in sorted(windows)[: len(windows) - self.max_windows]:
                del windows[start]

    def streams(self) -> list[str]:
        return sorted(self._streams)

    def windows(self, stream: str) -> list[WindowSummary]:
        """The stream's summaries, oldest window first."""
        held = self._streams.get(stream, {})
        return [held[start] for start in sorted(held)]

    def __len__(self) -> int:
        return sum(len(windows) for windows in self._streams.values())

    def snapshot(self) -> dict[str, Any]:
        """Everything held, as JSON-ready data: streams by name, windows oldest first."""
        return {
            "history_minutes": self.history.total_seconds() / 60,
            "streams": [
                {
                    "stream_id": stream,
                    "windows": [w.model_dump(mode="json") for w in self.windows(stream)],
                }
                for stream in self.streams()
            ],
        }
