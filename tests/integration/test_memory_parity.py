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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from consumer.decode.pool import InlineDecoder
from consumer.stream.memory_broker import MemoryBroker
from consumer.stream.worker import Worker
from schemas import DeadLetter
from tests.support.events import event_bytes
from tests.support.kafka import committed, end_offsets, produce, read
from tests.unit.test_worker_in_memory import FACES, FACES_DIR, StubEngine, worker_settings

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
    # Missing, in a folder the worker may read (fetch.file_roots): image_not_found.
    events[41] = event_bytes(FACES[0], image=(FACES_DIR / "no-such-face.png").as_uri())
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


# A dead letter as read from either broker: key, value, headers.
Letter = tuple[bytes | None, bytes, Sequence[tuple[str, bytes | None]]]


def _outcomes(
    results: list[bytes], dead_letters: list[Letter], offsets: dict[int, int]
) -> Outcomes:
    # Dead letters are the input record itself with the worker's emotion.* headers.
    letters = [DeadLetter.from_record(*letter) for letter in dead_letters]
    return Outcomes(
        results=Counter(json.loads(v)["event_id"] for v in results),
        dead_letters=Counter(
            (d.event_id, d.error_kind, d.source_partition, d.source_offset) for d in letters
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
    letters: list[Letter] = [
        (r.key, r.value, r.headers)
        for r in read(bootstrap, dead, expected=2, timeout_s=30, idle_s=1)
    ]
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
    letters: list[Letter] = [
        (m.key(), m.value() or b"", m.headers() or []) for m in broker.records("dead")
    ]
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


def _commit_reports(
    consumer: Any, topic: str, sink: list[tuple[Any, Any]]
) -> list[tuple[bool, list[int]]]:
    """A sync then an async commit; what on_commit reported: (failed, offsets) per report."""
    consumer.subscribe([topic])
    deadline = time.monotonic() + 30
    while not consumer.assignment():
        assert time.monotonic() < deadline, "no assignment"
        consumer.consume(1, timeout=0.2)
    consumer.commit(offsets=[TopicPartition(topic, 0, 1)], asynchronous=False)
    consumer.commit(offsets=[TopicPartition(topic, 0, 2)], asynchronous=True)
    deadline = time.monotonic() + 10
    while not sink and time.monotonic() < deadline:
        consumer.consume(1, timeout=0.2)
    consumer.consume(1, timeout=0.5)  # a late report of the sync commit would come now
    consumer.close()
    return [(error is not None, [tp.offset for tp in parts]) for error, parts in sink]


def test_on_commit_reports_the_same_commits_on_both_brokers(
    kafka_bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    """The Worker counts pending commits by on_commit reports: the fake must report exactly
    the commits the real client reports (the asynchronous one; none for a synchronous one)."""
    from confluent_kafka import Consumer

    def config(group: str, sink: list[tuple[Any, Any]]) -> dict[str, Any]:
        return {
            "group.id": group,
            "enable.auto.commit": False,
            "on_commit": lambda error, partitions: sink.append((error, partitions)),
        }

    topic = topic_factory("commits", 1)
    real_sink: list[tuple[Any, Any]] = []
    real = Consumer({"bootstrap.servers": kafka_bootstrap, **config("g-real", real_sink)})
    broker = MemoryBroker()
    broker.create_topic(topic, 1)
    fake_sink: list[tuple[Any, Any]] = []
    fake = broker.consumer_factory(config("g-fake", fake_sink))
    assert _commit_reports(real, topic, real_sink) == [(False, [2])]
    assert _commit_reports(fake, topic, fake_sink) == [(False, [2])]
