"""Crashes and stops: SIGKILL at random moments, SIGTERM mid-stream, exactly-once kills."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.checker import Stream
from tests.support.kafka import commit_progress, end_offsets
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.kafka

EVENTS = 300
MAX_IN_FLIGHT = 32
COMMIT_EVERY = 20
PACE = {"batch__max_batch_size": "4", "fetch__threads": "1", "batch__max_wait_ms": "5"}


def _run_with_kills(
    stream: Stream,
    start_worker: Callable[..., WorkerProcess],
    settings: dict[str, str],
    kills: int,
    seed: int,
) -> int:
    """Start, SIGKILL at a random moment after the worker joined, repeat; then finish.

    Before each kill the group's committed offsets must have moved past those of the
    previous kill while the worker ran: commits happen during processing, not only at a
    shutdown that a SIGKILL never lets come. Each kill is recorded with the offsets the
    killed worker had committed, for the checker's "dup below commit".
    """
    rng = random.Random(seed)
    for number in range(kills):
        worker = start_worker(**settings)
        worker.wait_for_log("partitions assigned", timeout_s=90)
        time.sleep(rng.uniform(0.5, 2.5))
        before = stream.last_commit()
        seen = stream.wait_for_commit_progress(running=worker.running)
        worker.kill()
        fault = stream.mark_fault(f"kill {number + 1}")
        assert commit_progress(before, fault.committed) > 0, (before, fault.committed)
        assert all(fault.committed[p] >= seen[p] for p in seen), (seen, fault.committed)
        print(f"kill {number + 1}: committed {before} -> {dict(fault.committed)}")
        if stream.distinct_so_far() >= len(stream.sent):
            pytest.fail(f"kill {number + 1} came after the stream finished; it proved nothing")
    last = start_worker(**settings)
    stream.results(timeout_s=180, idle_s=0.5)
    assert last.stop() == 0, last.log_text()[-3000:]
    return kills


def test_repeated_sigkill_loses_nothing(
    make_stream: Callable[..., Stream],
    start_worker: Callable[..., WorkerProcess],
    face_paths: list[Path],
    paced_images: str,
) -> None:
    stream = make_stream(partitions=3)
    stream.publish(face_paths, EVENTS, image_url=paced_images)
    settings = stream.settings(
        flow__max_in_flight=str(MAX_IN_FLIGHT),
        flow__resume_below="16",
        kafka__commit_every=str(COMMIT_EVERY),
        kafka__commit_interval_s="0.5",
        # Dynamic membership here (scenario 7 uses static): a killed member holds its
        # partitions until its session times out, so keep that short.
        kafka__consumer_config='{"session.timeout.ms": 6000}',
        **PACE,
    )
    kills = _run_with_kills(stream, start_worker, settings, kills=3, seed=7)
    note = f"{kills} kills; committed {stream.commits_at_faults()}"
    report = stream.report("1. SIGKILL x3 at random moments", note=note)
    assert report.missing == 0 and report.dup_below_commit == 0
    # What a kill can re-deliver: in flight, plus done but not yet committed (loose; the
    # report's "dup below commit" is the precise check: none below the commit at a kill).
    bound = kills * (2 * MAX_IN_FLIGHT + COMMIT_EVERY)
    assert report.duplicates <= bound, f"{report.duplicates} duplicates > bound {bound}"
    assert report.order_violations == 0
    assert stream.committed() == end_offsets(stream.bootstrap, stream.input_topic, 3)


def test_sigterm_mid_stream_drains_without_duplicates(
    make_stream: Callable[..., Stream],
    start_worker: Callable[..., WorkerProcess],
    face_paths: list[Path],
    paced_images: str,
) -> None:
    stream = make_stream(partitions=3)
    stream.publish(face_paths, EVENTS, image_url=paced_images)
    settings = stream.settings(**PACE)
    first = start_worker(**settings)
    stream.wait_for_results(40, timeout_s=60)
    assert first.stop() == 0, first.log_text()[-3000:]  # SIGTERM: drain, flush, commit
    stream.mark_fault("SIGTERM")
    stopped = [e for e in first.log_events() if e.get("event") == "worker stopped"]
    assert stopped and stopped[0]["unfinished"] == 0
    assert stream.distinct_so_far() < EVENTS, "the stream finished before SIGTERM"
    second = start_worker(**settings)
    stream.results(timeout_s=120)
    assert second.stop() == 0
    report = stream.report("2. SIGTERM mid-stream", note=f"stopped after {stopped[0]['results']}")
    assert report.missing == 0
    assert report.duplicates == 0
    assert report.order_violations == 0
    assert stream.committed() == end_offsets(stream.bootstrap, stream.input_topic, 3)


def test_exactly_once_with_repeated_sigkills(
    make_stream: Callable[..., Stream],
    start_worker: Callable[..., WorkerProcess],
    face_paths: list[Path],
    paced_images: str,
) -> None:
    stream = make_stream(partitions=3)
    stream.publish(face_paths, EVENTS, image_url=paced_images)
    settings = stream.settings(
        kafka__processing_guarantee="exactly_once",
        # The same identity across restarts: the new process fences the killed one and
        # aborts its open transaction at once.
        kafka__group_instance_id="eos-worker-0",
        kafka__commit_interval_s="0.3",
        **PACE,
    )
    kills = _run_with_kills(stream, start_worker, settings, kills=3, seed=11)
    note = f"{kills} kills; committed {stream.commits_at_faults()}"
    report = stream.report("7. exactly-once, SIGKILL x3", note=note)
    assert report.missing == 0
    assert report.duplicates == 0
    assert report.results + report.dead_letters == report.produced == report.distinct
    assert report.order_violations == 0
    assert stream.committed() == end_offsets(stream.bootstrap, stream.input_topic, 3)
