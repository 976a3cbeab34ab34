"""A worker SIGKILLed mid-stream and started again: every event ends with a result.

The outcomes are accounted for by the fault suite's checker (tests/faults/checker.py):
one result per event sent, naming that event, none for an offset never sent, and
duplicates only at offsets at or above what the killed worker had committed.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.checker import Fault, Outcome, Sent, tally
from tests.support.events import event_bytes
from tests.support.http_server import ImageServer
from tests.support.kafka import (
    Record,
    TopicReader,
    commit_progress,
    committed,
    end_offsets,
    produce,
    wait_for_commit_progress,
)
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.kafka

PARTITIONS = 2
EVENTS = 300


def _coordinates(records: list[Record]) -> Counter[tuple[int, int]]:
    return Counter(Outcome.of_result(r).coord for r in records)


def test_sigkill_mid_stream_loses_nothing(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_worker: Callable[..., WorkerProcess],
    face_paths: list[Path],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    for i, path in enumerate(face_paths[:EVENTS]):
        shutil.copy(path, served / f"{i}.png")
    frames = topic_factory("frames", PARTITIONS)
    out = topic_factory("emotions", PARTITIONS)
    group = f"group-{frames}"
    settings = {
        "kafka__input_topic": frames,
        "kafka__output_topic": out,
        "kafka__dead_letter_topic": topic_factory("dead"),
        "kafka__group_id": group,
        "fetch__threads": "2",
        "batch__max_batch_size": "8",
    }

    def group_commits() -> dict[int, int]:
        return committed(kafka_bootstrap, group, frames, PARTITIONS)

    # A slow image server (25 ms a request, 2 fetch threads) keeps the stream going for
    # several seconds, so the kill lands in the middle of it.
    with ImageServer(served, delay_s=0.025) as server:
        values = [
            event_bytes(
                served / f"{i}.png", stream_id=f"cam-{i % 4}", image=f"{server.url}/{i}.png"
            )
            for i in range(EVENTS)
        ]
        coords = produce(kafka_bootstrap, frames, values, spread=PARTITIONS)
        sent = {
            coord: Sent(json.loads(value)["event_id"], value)
            for coord, (_, value) in zip(coords, values, strict=True)
        }

        first = start_worker(**settings)
        with TopicReader(kafka_bootstrap, [out]) as reader:
            assert reader.wait(lambda records: len(records) >= 30, timeout_s=120)
            # Commits while it runs: a worker that commits only when it shuts down (which
            # a SIGKILL never lets it do) fails here.
            wait_for_commit_progress(group_commits, {}, timeout_s=60, running=first.running)
            first.kill()
            kill = Fault("SIGKILL", time.time_ns() // 1_000_000, group_commits())
            seen_at_kill = _coordinates(reader.catch_up())  # everything out by the kill
        if len(seen_at_kill) >= EVENTS:
            pytest.fail("the stream finished before the kill; the test proved nothing")
        assert commit_progress({}, kill.committed) > 0

        second = start_worker(**settings)
        with TopicReader(kafka_bootstrap, [out]) as reader:
            reader.wait(lambda records: set(_coordinates(records)) >= set(sent), timeout_s=180)
            reader.wait(lambda _records: False, timeout_s=1.0)  # late duplicates, if any
            records = reader.catch_up()
        assert second.stop() == 0, second.log_text()[-3000:]

    report = tally(
        "SIGKILL mid-stream", frames, sent, [Outcome.of_result(r) for r in records], [kill]
    )
    print(
        f"\nSIGKILL after {len(seen_at_kill)} of {EVENTS} results (committed "
        f"{dict(kill.committed)}); {report.duplicates} duplicate results after restart"
    )
    record_property("killed_after_results", len(seen_at_kill))
    record_property("duplicates", report.duplicates)
    # Every event has exactly its own result; duplicates only at offsets >= the commit.
    assert report.complete, "\n".join(report.problems[:40])
    assert report.missing == report.dup_below_commit == report.dead_letters == 0
    # Duplicates can only come from results published but not committed before the kill.
    assert report.duplicates <= len(seen_at_kill)
    assert committed(kafka_bootstrap, group, frames, PARTITIONS) == end_offsets(
        kafka_bootstrap, frames, PARTITIONS
    )
