"""The summarizer's windows, with plain values: closing, grace, lateness, duplicates, idleness
and the arithmetic of a summary."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from consumer.config import SummarizeSettings
from consumer.summarize.results import facts_of
from consumer.summarize.windows import Closed, PartitionWindows, WindowRules
from schemas import EmotionResult
from tests.support.results import T0, classified, expected_windows, result, skipped

RULES = WindowRules(length_ms=10_000, grace_ms=5_000, max_skew_ms=300_000)
CLOSED_AT = datetime(2026, 3, 1, 13, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _windows(clock: Clock | None = None) -> PartitionWindows:
    return PartitionWindows(RULES, clock or Clock())


def _starts(closed: list[Closed]) -> list[tuple[str, float]]:
    return [(c.stream_id, (c.window.start_ms - _ms(T0)) / 1000) for c in closed]


def _ms(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def _add(windows: PartitionWindows, res: EmotionResult) -> tuple[str, list[Closed]]:
    return windows.add(facts_of(res))


def test_rules_from_settings() -> None:
    rules = WindowRules.from_settings(SummarizeSettings(window_s=2.5, grace_s=0.5))
    assert (rules.length_ms, rules.grace_ms, rules.max_skew_ms) == (2500, 500, 300_000)
    assert rules.start_of(7499) == 5000 and rules.start_of(7500) == 7500


def test_a_window_closes_when_the_watermark_reaches_its_end_plus_grace() -> None:
    w = _windows()
    face = [classified("happy")]
    assert _add(w, result("cam", 1, 0, face)) == ("counted", [])
    assert _add(w, result("cam", 14.999, 1, face)) == ("counted", [])  # 10 + 5 not reached
    outcome, closed = _add(w, result("cam", 15, 2, face))
    assert outcome == "counted" and _starts(closed) == [("cam", 0)]
    assert closed[0].reason == "watermark"
    assert closed[0].window.result_ids == {result("cam", 1, 0, face).result_id}


def test_late_within_grace_is_counted_beyond_grace_dropped() -> None:
    w = _windows()
    face = [classified("sad")]
    _add(w, result("cam", 1, 0, face))
    _add(w, result("cam", 12, 1, face))  # watermark 12: window 0 still open (10 + 5 > 12)
    assert _add(w, result("cam", 3, 2, face)) == ("counted", [])  # late, within grace
    _, closed = _add(w, result("cam", 16, 3, face))  # 16 >= 15: window 0 closes
    assert _starts(closed) == [("cam", 0)] and len(closed[0].window.result_ids) == 2  # 1, 3
    assert _add(w, result("cam", 4, 4, face)) == ("late", [])  # its window is closed
    # A window that was never opened but whose grace is over is late too, not opened.
    _, closed = _add(w, result("cam", 40, 5, face))
    assert _starts(closed) == [("cam", 10)]
    assert _add(w, result("cam", 21, 6, face)) == ("late", [])  # [20, 30): 30 + 5 <= 40
    assert _add(w, result("cam", 36, 7, face)) == ("counted", [])  # [30, 40): 45 > 40
    assert sorted(w.streams["cam"].open) == [_ms(T0) + 30_000, _ms(T0) + 40_000]


def test_duplicates_are_dropped_by_result_id() -> None:
    w = _windows()
    first = result("cam", 1, 0, [classified("happy"), skipped()])
    assert _add(w, first)[0] == "counted"
    assert _add(w, first)[0] == "duplicate"
    assert _add(w, result("cam", 2, 1, [classified("happy")]))[0] == "counted"
    _, closed = _add(w, result("cam", 30, 2, []))
    (window,) = [c.window for c in closed]
    assert (len(window.result_ids), window.faces, window.classified, window.skipped) == (2, 3, 2, 1)
    # After its window closed, the duplicate is dropped as late: never a second summary.
    assert _add(w, first) == ("late", [])


def test_idle_streams_close_all_their_windows_others_keep_theirs() -> None:
    clock = Clock()
    w = _windows(clock)
    _add(w, result("quiet", 1, 0, [classified("fearful")]))
    _add(w, result("quiet", 11, 1, [classified("fearful")]))
    clock.now = 130.0
    _add(w, result("busy", 2, 2, [classified("happy")]))
    closed = w.close_idle(seen_before=clock.now - 20)  # quiet: seen at 100, busy at 130
    assert _starts(closed) == [("quiet", 0), ("quiet", 10)]
    assert all(c.reason == "idle" for c in closed)
    assert w.streams["busy"].open and not w.streams["quiet"].open
    # Its closed windows stay closed; a later one opens as usual.
    assert _add(w, result("quiet", 12, 3, [classified("fearful")])) == ("late", [])
    assert _add(w, result("quiet", 21, 4, [classified("fearful")]))[0] == "counted"
    assert w.close_idle(seen_before=clock.now - 20) == []


def test_results_from_the_future_are_dropped() -> None:
    w = _windows()
    res = result("cam", 1, 0, [classified("happy")])
    ahead = res.model_copy(update={"captured_at": res.processed_at + timedelta(seconds=301)})
    assert _add(w, ahead) == ("future", [])
    assert "cam" not in w.streams  # no watermark from it: it closes nothing
    near = res.model_copy(update={"captured_at": res.processed_at + timedelta(seconds=299)})
    assert _add(w, near)[0] == "counted"


def test_summary_arithmetic() -> None:
    w = _windows()
    results = [
        result("cam", 0.5, 0, [classified("happy", 0.9), classified("sad", 0.6), skipped()]),
        result("cam", 3, 1, [classified("happy", 0.7)]),
        result("cam", 4, 2, [skipped()]),
        result("cam", 9.999, 3, []),  # no face: a result with none
    ]
    for res in results:
        _add(w, res)
    _, closed = _add(w, result("cam", 100, 4, []))
    summary = closed[0].window.summary("cam", CLOSED_AT)
    assert summary.window_start == T0 and summary.window_end == T0 + timedelta(seconds=10)
    assert (summary.results, summary.faces, summary.classified, summary.skipped) == (4, 5, 3, 2)
    assert summary.skipped_share == pytest.approx(2 / 5)
    assert summary.mean_confidence == pytest.approx((0.9 + 0.6 + 0.7) / 3)
    assert summary.labels["happy"].faces == 2 and summary.labels["sad"].faces == 1
    assert summary.labels["angry"].faces == 0
    happy_scores = [0.9, 0.4 / 6, 0.7]  # the sad face gives happy a share of its rest
    assert summary.labels["happy"].mean_score == pytest.approx(sum(happy_scores) / 3)
    assert summary.closed_at == CLOSED_AT
    expected = expected_windows(results, 10)[("cam", T0)]
    assert summary.labels["sad"].mean_score == pytest.approx(expected.mean_scores["sad"])


def test_a_window_without_classified_faces() -> None:
    w = _windows()
    _add(w, result("cam", 1, 0, [skipped(), skipped()]))
    _add(w, result("cam", 2, 1, []))
    (c,) = w.close_idle(seen_before=float("inf"))
    summary = c.window.summary("cam", CLOSED_AT)
    assert (summary.results, summary.faces, summary.skipped, summary.skipped_share) == (2, 2, 2, 1)
    assert summary.mean_confidence is None and summary.labels == {}
    (empty,) = [result("other", 1, 2, [])]
    _add(w, empty)
    (c,) = w.close_idle(seen_before=float("inf"))
    assert c.window.summary("other", CLOSED_AT).skipped_share == 0


def test_changes_name_what_moved_and_closed_windows_as_tombstones() -> None:
    w = _windows()
    _add(w, result("a", 1, 0, [classified("happy")]))
    _add(w, result("b", 1, 1, [classified("happy")]))
    first = w.take_changes()
    assert set(first.windows) == {("a", _ms(T0)), ("b", _ms(T0))}
    assert set(first.streams) == {"a", "b"}
    assert w.take_changes().windows == {}  # taken
    _add(w, result("a", 15, 2, [classified("happy")]))
    changes = w.take_changes()
    assert changes.windows[("a", _ms(T0))] is None  # closed: a tombstone
    assert changes.windows[("a", _ms(T0) + 10_000)] is not None
    assert changes.streams["a"].closed_until_ms == _ms(T0) + 10_000
    assert set(changes.streams) == {"a"}
