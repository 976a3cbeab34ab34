"""A worker SIGKILLed mid-stream and started again: every event ends with a result."""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas import EmotionResult
from tests.support.events import event_bytes
from tests.support.http_server import ImageServer
from tests.support.kafka import Record, committed, end_offsets, produce, read

PARTITIONS = 2
EVENTS = 300


def _coordinates(records: list[Record]) -> Counter[tuple[int, int]]:
    results = (EmotionResult.model_validate_json(r.value) for r in records)
    return Counter((r.source.partition, r.source.offset) for r in results)


def test_sigkill_mid_stream_loses_nothing(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_worker: Callable[..., object],
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

    # A slow image server (25 ms a request, 2 fetch threads) keeps the stream going for
    # several seconds, so the kill lands in the middle of it.
    with ImageServer(served, delay_s=0.025) as server:
        values = [
            event_bytes(
                served / f"{i}.png", stream_id=f"cam-{i % 4}", image=f"{server.url}/{i}.png"
            )
            for i in range(EVENTS)
        ]
        coords = set(produce(kafka_bootstrap, frames, values, spread=PARTITIONS))

        first = start_worker(**settings)
        before_kill = read(kafka_bootstrap, out, expected=30, timeout_s=120)
        first.kill()
        seen_at_kill = _coordinates(read(kafka_bootstrap, out, expected=EVENTS, timeout_s=3))
        if len(seen_at_kill) >= EVENTS:
            pytest.fail("the stream finished before the kill; the test proved nothing")
        assert len(before_kill) >= 30

        second = start_worker(**settings)
        records = read(
            kafka_bootstrap,
            out,
            expected=EVENTS,
            timeout_s=180,
            idle_s=1.0,
            until=lambda rs: set(_coordinates(rs)) >= coords,
        )
        assert second.stop() == 0, second.log_text()[-3000:]

    counts = _coordinates(records)
    missing = coords - set(counts)
    duplicates = sum(n - 1 for n in counts.values())
    print(
        f"\nSIGKILL after {len(seen_at_kill)} of {EVENTS} results; "
        f"{duplicates} duplicate results after restart"
    )
    record_property("killed_after_results", len(seen_at_kill))
    record_property("duplicates", duplicates)
    assert not missing, f"{len(missing)} events never got a result"
    assert set(counts) == coords
    # Duplicates can only come from results published but not committed before the kill.
    assert duplicates <= len(seen_at_kill)
    assert committed(kafka_bootstrap, group, frames, PARTITIONS) == end_offsets(
        kafka_bootstrap, frames, PARTITIONS
    )
