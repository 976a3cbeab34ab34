"""OffsetTracker: only the contiguous done prefix of a partition is committable."""

from __future__ import annotations

import pytest

from consumer.stream.offsets import OffsetTracker

TP = ("frames", 0)
OTHER = ("frames", 1)


def test_out_of_order_completion_commits_only_the_prefix() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12, 13):
        tracker.track(TP, offset)
    tracker.mark_done(TP, 12)
    tracker.mark_done(TP, 11)
    assert tracker.committable() == {}  # 10 is still in flight
    tracker.mark_done(TP, 10)
    assert tracker.committable() == {TP: 13}  # next offset to read after 12
    assert tracker.in_flight() == 1
    tracker.mark_done(TP, 13)
    assert tracker.committable() == {TP: 14}


def test_gaps_in_offsets_do_not_block() -> None:
    tracker = OffsetTracker()
    for offset in (5, 9, 20):  # compaction or transaction markers leave gaps
        tracker.track(TP, offset)
    for offset in (20, 5, 9):
        tracker.mark_done(TP, offset)
    assert tracker.committable() == {TP: 21}


def test_committable_reports_only_moved_partitions() -> None:
    tracker = OffsetTracker()
    tracker.track(TP, 0)
    tracker.track(OTHER, 0)
    tracker.mark_done(TP, 0)
    assert tracker.committable() == {TP: 1}
    tracker.mark_committed({TP: 1})
    assert tracker.committable() == {}
    tracker.mark_done(OTHER, 0)
    assert tracker.committable() == {OTHER: 1}


def test_revoked_partition_is_never_committable() -> None:
    tracker = OffsetTracker()
    tracker.track(TP, 0)
    tracker.revoke(TP)
    tracker.mark_done(TP, 0)  # a late delivery report for a partition we gave away
    assert tracker.committable() == {}
    assert not tracker.owns(TP)
    assert tracker.in_flight() == 0


def test_offsets_must_increase() -> None:
    tracker = OffsetTracker()
    tracker.track(TP, 3)
    with pytest.raises(ValueError, match="not after"):
        tracker.track(TP, 3)


def test_in_flight_counts_per_partition() -> None:
    tracker = OffsetTracker()
    tracker.track(TP, 0)
    tracker.track(TP, 1)
    tracker.track(OTHER, 7)
    assert tracker.in_flight() == 3
    assert tracker.in_flight([TP]) == 2
    assert tracker.in_flight([("nope", 0)]) == 0


def test_bytes_in_flight_follow_tracking_and_completion() -> None:
    tracker = OffsetTracker()
    tracker.track(TP, 0, size=100)
    tracker.track(TP, 1, size=50)
    tracker.add_size(TP, 0, 1000)  # decoded faces
    assert tracker.bytes_in_flight() == 1150
    tracker.mark_done(TP, 0)
    tracker.mark_done(TP, 0)  # a repeated report changes nothing
    assert tracker.bytes_in_flight() == 50
    tracker.revoke(TP)
    assert tracker.bytes_in_flight() == 0


def test_committable_for_some_partitions_and_done_count() -> None:
    tracker = OffsetTracker()
    for tp in (TP, OTHER):
        tracker.track(tp, 0)
        tracker.mark_done(tp, 0)
    assert tracker.done_since_commit() == 2
    assert tracker.committable([OTHER]) == {OTHER: 1}
    tracker.mark_committed({OTHER: 1})
    assert tracker.done_since_commit() == 0
    assert tracker.committed() == {TP: None, OTHER: 1}
