"""Group changes: a worker joins and leaves mid-stream; a model step slower than
max.poll.interval.ms."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.checker import Stream
from tests.support.kafka import end_offsets
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.kafka

PACE = {"batch__max_batch_size": "4", "fetch__threads": "1", "batch__max_wait_ms": "5"}
BATCH_DELAY_S = 6.5
MAX_POLL_INTERVAL_MS = 6000


def commits_outside_ownership(worker: WorkerProcess) -> list[str]:
    """Commits a worker logged for partitions it did not own at that moment."""
    owned: set[int] = set()
    wrong = []
    for entry in worker.log_events():
        event = entry.get("event")
        if event == "partitions assigned":
            owned |= set(entry["partitions"])  # type: ignore[arg-type]
        elif event in ("partitions revoked", "partitions lost"):
            owned -= set(entry["partitions"])  # type: ignore[arg-type]
        elif event == "offsets committed":
            for name in entry["offsets"]:  # type: ignore[union-attr]
                partition = int(str(name).rsplit(":", 1)[1])
                if partition not in owned:
                    wrong.append(f"{name} at {entry['timestamp']}")
    return wrong


def test_worker_joins_and_leaves_mid_stream(
    make_stream: Callable[..., Stream],
    start_worker: Callable[..., WorkerProcess],
    face_paths: list[Path],
    paced_images: str,
) -> None:
    stream = make_stream(partitions=4)
    stream.publish(face_paths, 600, image_url=paced_images)
    settings = stream.settings(
        log__level="debug",
        kafka__commit_interval_s="0.2",
        flow__max_in_flight="32",
        flow__resume_below="16",
        **PACE,
    )
    first = start_worker(**settings)
    stream.wait_for_results(30, timeout_s=60)
    second = start_worker(**settings)  # joins: cooperative-sticky moves some partitions
    # More events while the second worker loads its model: on a busy machine its start
    # alone can take as long as the first 600 events, and it must leave mid-stream.
    stream.publish(face_paths, 900, start=600, image_url=paced_images)
    # Cooperative rebalancing takes two rounds: first the revoke, then the new assignment.
    second.wait_for_event(
        lambda e: e.get("event") == "partitions assigned" and bool(e.get("partitions")),
        "a non-empty assignment",
    )
    second.wait_for_event(lambda e: e.get("event") == "offsets committed", "a commit")
    assert second.stop() == 0, second.log_text()[-3000:]  # leaves: partitions move back
    if stream.distinct_so_far() >= len(stream.sent):
        pytest.fail("the stream finished before the second worker left; it proved nothing")
    stream.results(timeout_s=120)
    assert first.stop() == 0, first.log_text()[-3000:]

    moved = [e for e in first.log_events() if e.get("event") == "partitions revoked"]
    report = stream.report("4. worker joins, then leaves", note=f"{len(moved)} revokes in #1")
    assert moved, "the join moved no partition away from the first worker"
    assert report.missing == 0
    assert report.order_violations == 0
    for worker in (first, second):
        assert commits_outside_ownership(worker) == []
    assert stream.committed() == end_offsets(stream.bootstrap, stream.input_topic, 4)


def test_model_step_slower_than_max_poll_interval(
    make_stream: Callable[..., Stream],
    start_worker: Callable[..., WorkerProcess],
    face_paths: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = make_stream(partitions=2)
    stream.publish(face_paths, 8)
    # Each batch of 4 takes 6.5 s, longer than max.poll.interval.ms = 6 s (6 s is also the
    # broker's default minimum session timeout, which caps how low both can go).
    monkeypatch.setenv("FAULT_BATCH_DELAY_S", str(BATCH_DELAY_S))
    settings = stream.settings(
        batch__max_batch_size="4",
        batch__max_wait_ms="500",
        kafka__consumer_config=json.dumps(
            {"max.poll.interval.ms": MAX_POLL_INTERVAL_MS, "session.timeout.ms": 6000}
        ),
    )
    worker = start_worker(module="tests.faults.slow_worker", **settings)
    stream.results(timeout_s=120, idle_s=0.5)
    assert worker.stop() == 0, worker.log_text()[-3000:]
    slow = [e for e in worker.log_events() if e.get("event") == "slow batch"]
    took = ", ".join(f"{float(str(e['took_s'])):.1f}" for e in slow)
    report = stream.report(
        "5. batch > max.poll.interval.ms", note=f"batches took {took} s; 6 s limit"
    )
    log = worker.log_text()
    assert "maximum poll interval" not in log.lower()
    events = [e.get("event") for e in worker.log_events()]
    assert events.count("partitions revoked") <= 1  # only the one when it closed
    assert events.count("partitions assigned") == 1  # never evicted and re-joined
    assert "partitions lost" not in events
    assert report.missing == 0 and report.duplicates == 0

    # The delay really ran: every batch of the 8 events (at most 4 each) took longer than
    # max.poll.interval.ms, by the wrapper's own clock and by the results' timestamps.
    assert sum(int(str(e["faces"])) for e in slow) == 8, slow
    assert len(slow) >= 2, slow
    assert all(float(str(e["took_s"])) * 1000 > MAX_POLL_INTERVAL_MS for e in slow), slow
    stamps = sorted(r.timestamp_ms for r in stream.result_records())
    assert stamps[-1] - stamps[0] > MAX_POLL_INTERVAL_MS, stamps  # batches one after another
