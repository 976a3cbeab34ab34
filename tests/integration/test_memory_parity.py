"""The in-memory broker against the real one: one scenario, the same outcomes.

60 events over 3 partitions, 2 of them poison, one worker until every offset is
committed, then a graceful stop. Results per event id, dead letters per event id and kind,
and the committed offsets must be equal on both brokers.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from consumer.decode_pool import InlineDecoder
from consumer.pipeline import Worker
from consumer.stream.memory_broker import MemoryBroker
from tests.support.events import event_bytes
from tests.support.kafka import committed, end_offsets, produce, read
from tests.unit.test_worker_in_memory import FACES, StubEngine, worker_settings

pytestmark = pytest.mark.kafka

PARTITIONS = 3


@dataclass
class Outcomes:
    results: Counter[str]  # event id -> results
    dead_letters: Counter[tuple[str | None, str, int, int]]  # (event id, kind, partition, offset)
    committed: dict[int, int]


def _events() -> list[tuple[bytes | None, bytes]]:
    events: list[tuple[bytes | None, bytes]] = [
        event_bytes(FACES[i % len(FACES)], stream_id=f"s{i % 4}") for i in range(60)
    ]
    key, _ = events[10]
    events[10] = (key, b"{not json")
    events[41] = event_bytes(FACES[0], image="file:///no/such/face.png")
    return events


def _run(worker: Worker, done: Callable[[], bool], timeout_s: float) -> int | None:
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(worker.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "the worker did not commit every offset in time"
        assert thread.is_alive(), f"worker stopped early: {worker.failure}"
        time.sleep(0.2)
    worker.request_stop()
    thread.join(30)
    return code[0] if code else None


def _outcomes(results: list[bytes], dead_letters: list[bytes], offsets: dict[int, int]) -> Outcomes:
    letters = [json.loads(v) for v in dead_letters]
    return Outcomes(
        results=Counter(json.loads(v)["event_id"] for v in results),
        dead_letters=Counter(
            (d["event_id"], d["error_kind"], d["source"]["partition"], d["source"]["offset"])
            for d in letters
        ),
        committed=offsets,
    )


def _on_kafka(
    bootstrap: str, topic_factory: Callable[..., str], events: list[tuple[bytes | None, bytes]]
) -> Outcomes:
    frames = topic_factory("parity-frames", PARTITIONS)
    out, dead = topic_factory("parity-emotions", 1), topic_factory("parity-dead", 1)
    group = f"group-{frames}"
    produce(bootstrap, frames, events, partition_of=lambda i: i % PARTITIONS)
    settings = worker_settings(
        bootstrap_servers=bootstrap,
        group_id=group,
        input_topic=frames,
        output_topic=out,
        dead_letter_topic=dead,
    )
    worker = Worker(
        settings, StubEngine(), decoder=InlineDecoder(settings.faces, settings.fetch.max_pixels)
    )
    ends = end_offsets(bootstrap, frames, PARTITIONS)

    def all_committed() -> bool:
        return committed(bootstrap, group, frames, PARTITIONS) == ends

    assert _run(worker, all_committed, timeout_s=120) == 0
    results = [r.value for r in read(bootstrap, out, expected=58, timeout_s=30, idle_s=1)]
    letters = [r.value for r in read(bootstrap, dead, expected=2, timeout_s=30, idle_s=1)]
    return _outcomes(results, letters, committed(bootstrap, group, frames, PARTITIONS))


def _in_memory(events: list[tuple[bytes | None, bytes]]) -> Outcomes:
    broker = MemoryBroker()
    broker.create_topic("frames", PARTITIONS)
    broker.create_topic("emotions", 1)
    broker.create_topic("dead", 1)
    for i, (key, value) in enumerate(events):
        broker.produce("frames", value, key=key, partition=i % PARTITIONS)
    settings = worker_settings(
        group_id="group", input_topic="frames", output_topic="emotions", dead_letter_topic="dead"
    )
    worker = Worker(
        settings,
        StubEngine(),
        consumer_factory=broker.consumer_factory,
        producer_factory=broker.producer_factory,
        decoder=InlineDecoder(settings.faces, settings.fetch.max_pixels),
    )
    ends = broker.end_offsets("frames")
    assert _run(worker, lambda: broker.committed("group", "frames") == ends, 30) == 0
    results = [m.value() or b"" for m in broker.records("emotions")]
    letters = [m.value() or b"" for m in broker.records("dead")]
    return _outcomes(results, letters, broker.committed("group", "frames"))


def test_memory_broker_gives_the_outcomes_of_the_real_one(
    kafka_bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    events = _events()
    real = _on_kafka(kafka_bootstrap, topic_factory, events)
    memory = _in_memory(events)
    assert sum(real.results.values()) == 58 and set(real.results.values()) == {1}
    assert sorted(k for _, k, _, _ in real.dead_letters) == ["image_not_found", "not_json"]
    assert memory.results == real.results
    assert memory.dead_letters == real.dead_letters
    assert memory.committed == real.committed == {0: 20, 1: 20, 2: 20}
