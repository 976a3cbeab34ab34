"""The real Worker, unchanged, on the in-memory broker: delivery guarantees end to end."""

from __future__ import annotations

import functools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import consumer.stream.client_errors
from consumer.config import (
    BatchSettings,
    DecodeSettings,
    FetchSettings,
    FlowSettings,
    HealthSettings,
    KafkaSettings,
    WorkerSettings,
)
from consumer.decode.pool import InlineDecoder
from consumer.ops.metrics import HealthState
from consumer.stream.client_errors import BrokerReachability
from consumer.stream.memory_broker import MemoryBroker
from consumer.stream.memory_consumer import MemoryConsumer
from consumer.stream.worker import Worker
from schemas import DeadLetter, EmotionResult
from tests.support.events import event_bytes

# The FER faces committed with the repository (tests/conftest.py FER_FACES).
FACES_DIR = Path(__file__).resolve().parents[2] / "data" / "faces"
FACES = sorted(FACES_DIR.glob("*/*.png"))[:8]
INPUT, OUTPUT, DEAD, GROUP = "frames", "emotions", "dead-letters", "workers"


@dataclass(frozen=True)
class _Scores:
    label: str
    confidence: float
    scores: dict[str, float]


class StubEngine:
    """A Classifier that answers at once: the model is not what these tests are about."""

    model_id = "stub"

    def classify(self, faces: Sequence[Image.Image]) -> list[_Scores]:
        return [_Scores("happy", 0.75, {"happy": 0.75, "sad": 0.25}) for _ in faces]


def worker_settings(flow: FlowSettings | None = None, **kafka: Any) -> WorkerSettings:
    """Fast settings: short poll and commit intervals, inline decoding, no HTTP server."""
    kafka = {
        "bootstrap_servers": "memory:9092",
        "group_id": GROUP,
        "input_topic": INPUT,
        "output_topic": OUTPUT,
        "dead_letter_topic": DEAD,
        "poll_timeout_s": 0.02,
        "commit_interval_s": 0.05,
        "revoke_timeout_s": 2.0,
        **kafka,
    }
    return WorkerSettings(
        kafka=KafkaSettings(**kafka),
        batch=BatchSettings(max_batch_size=8, max_wait_ms=2),
        # The events name the faces by file:// path: their folder must be readable.
        fetch=FetchSettings(threads=2, file_roots=(FACES_DIR,)),
        decode=DecodeSettings(isolation="thread"),
        flow=flow or FlowSettings(drain_timeout_s=5),
        health=HealthSettings(enabled=False, statistics_interval_s=0.05),
    )


class Running:
    """A Worker on its own thread, as `emotion-worker` runs it."""

    def __init__(self, broker: MemoryBroker, settings: WorkerSettings) -> None:
        self.health = HealthState(60, 300)
        self.health.model_ready = True
        self.worker = Worker(
            settings,
            StubEngine(),
            consumer_factory=broker.consumer_factory,
            producer_factory=broker.producer_factory,
            decoder=InlineDecoder(settings.faces, settings.fetch.max_pixels),
            health=self.health,
        )
        self.consumer: MemoryConsumer = broker.consumers[-1]
        self.code: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.code = self.worker.run()

    def stop(self, timeout_s: float = 10.0) -> int | None:
        self.worker.request_stop()
        return self.join(timeout_s)

    def join(self, timeout_s: float = 10.0) -> int | None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "worker did not stop"
        return self.code


def _until(check: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _events(
    broker: MemoryBroker, count: int, partitions: int, poison: dict[int, bytes] | None = None
) -> dict[tuple[int, int], str | None]:
    """Publish `count` events round-robin; (partition, offset) -> event id (None: unparsable)."""
    sent: dict[tuple[int, int], str | None] = {}
    for i in range(count):
        key, value = event_bytes(FACES[i % len(FACES)], stream_id=f"s{i % 3}")
        if poison and i in poison:
            value = poison[i]
        coords = broker.produce(INPUT, value, key=key, partition=i % partitions)
        sent[coords] = _event_id(value)
    return sent


def _event_id(value: bytes) -> str | None:
    try:
        return str(json.loads(value)["event_id"])
    except (ValueError, KeyError, TypeError):
        return None


def _results(broker: MemoryBroker, read_committed: bool = True) -> list[EmotionResult]:
    return [
        EmotionResult.model_validate_json(m.value() or b"")
        for m in broker.records(OUTPUT, read_committed=read_committed)
    ]


def _dead(broker: MemoryBroker, read_committed: bool = True) -> list[DeadLetter]:
    return [
        DeadLetter.from_record(m.key(), m.value(), m.headers())
        for m in broker.records(DEAD, read_committed=read_committed)
    ]


def _outcomes(broker: MemoryBroker) -> int:
    return len(_results(broker)) + len(_dead(broker))


def _all_committed(broker: MemoryBroker) -> bool:
    return broker.committed(GROUP, INPUT) == broker.end_offsets(INPUT)


def _topics(broker: MemoryBroker, partitions: int) -> None:
    broker.create_topic(INPUT, partitions)
    broker.create_topic(OUTPUT, 2)
    broker.create_topic(DEAD, 1)


def test_every_event_gets_one_result_and_offsets_reach_the_end() -> None:
    broker = MemoryBroker()
    _topics(broker, 3)
    sent = _events(broker, 30, 3)
    running = Running(broker, worker_settings())
    _until(lambda: _all_committed(broker), what="all offsets committed")
    assert running.stop() == 0
    counts = Counter(r.event_id for r in _results(broker))
    assert counts == Counter(event_id for event_id in sent.values())
    assert _dead(broker) == []
    assert broker.commit_log and all(c.owned for c in broker.commit_log)
    assert running.worker.metrics.counts().results == 30


def test_committed_offsets_never_pass_unacknowledged_outcomes() -> None:
    broker = MemoryBroker()
    _topics(broker, 2)
    broker.hold_deliveries(True)
    _events(broker, 12, 2)
    running = Running(broker, worker_settings(commit_interval_s=0.01))
    _until(lambda: len(running.consumer.assignment()) == 2, what="assignment")
    _until(lambda: running.worker.metrics.counts().consumed == 12, what="events read")
    time.sleep(0.2)  # commit ticks pass while every outcome waits for its ack
    assert broker.committed(GROUP, INPUT) == {}
    broker.hold_deliveries(False)
    broker.set_ack_delay(0.01)  # acks trickle in while commits go on
    for _ in range(4):
        _events(broker, 6, 2)
        time.sleep(0.03)
    _until(lambda: _all_committed(broker), what="all offsets committed")
    assert running.stop() == 0
    acked_at: dict[
        tuple[int, int], int
    ] = {}  # input (partition, offset) -> seq of its acknowledged outcome
    for topic in (OUTPUT, DEAD):
        for partition in range(broker.partitions(topic)):
            for record in broker.stored(topic, partition):
                if record.value is not None:
                    source = json.loads(record.value)["source"]
                    acked_at.setdefault((source["partition"], source["offset"]), record.seq)
    commits = [c for c in broker.commit_log if c.topic == INPUT]
    assert len(commits) >= 2
    for commit in commits:
        for offset in range(commit.offset):
            acked = acked_at.get((commit.partition, offset))
            assert acked is not None and acked <= commit.seq, (commit, offset)


def test_poison_events_become_dead_letters_and_the_partition_moves_on() -> None:
    broker = MemoryBroker()
    _topics(broker, 1)
    _key, missing = event_bytes(FACES[0], image=(FACES_DIR / "no-such-face.png").as_uri())
    _key, outside = event_bytes(FACES[0], image="file:///etc/hostname")  # not under file_roots
    poison = {3: b"{not json", 7: missing, 9: outside}
    sent = _events(broker, 12, 1, poison=poison)
    running = Running(broker, worker_settings())
    _until(lambda: _all_committed(broker), what="all offsets committed")
    assert running.stop() == 0
    dead = {(d.source.offset, d.error_kind, d.event_id) for d in _dead(broker)}
    assert dead == {
        (3, "not_json", None),
        (7, "image_not_found", sent[(0, 7)]),
        (9, "image_fetch_refused", sent[(0, 9)]),
    }
    assert len(_results(broker)) == 9
    assert broker.committed(GROUP, INPUT) == {0: 12}


def test_backpressure_pauses_and_resumes_the_partitions() -> None:
    broker = MemoryBroker()
    _topics(broker, 2)
    broker.hold_deliveries(True)
    _events(broker, 20, 2)
    flow = FlowSettings(max_in_flight=4, resume_below=1, drain_timeout_s=5)
    running = Running(broker, worker_settings(flow=flow))
    consumer = running.consumer
    _until(lambda: consumer.paused() == [(INPUT, 0), (INPUT, 1)], what="paused partitions")
    time.sleep(0.1)
    assert running.worker.metrics.counts().consumed == 4  # nothing more read while paused
    broker.hold_deliveries(False)
    _until(lambda: _all_committed(broker), what="all offsets committed")
    _until(lambda: consumer.paused() == [], what="resumed partitions")
    assert running.stop() == 0
    assert len(_results(broker)) == 20


def test_a_second_worker_joining_mid_stream_loses_nothing() -> None:
    broker = MemoryBroker()
    _topics(broker, 4)
    sent = _events(broker, 40, 4)
    first = Running(broker, worker_settings())
    _until(lambda: _outcomes(broker) >= 10, what="first results")
    second = Running(broker, worker_settings())
    sent.update(_events(broker, 40, 4))
    _until(lambda: second.consumer.assignment() != [], what="second worker assigned")
    _until(lambda: _all_committed(broker), what="all offsets committed")
    assert len(first.consumer.assignment()) == 2 and len(second.consumer.assignment()) == 2
    assert first.stop() == 0 and second.stop() == 0
    seen = {r.event_id for r in _results(broker)}
    assert seen == set(sent.values())
    assert all(c.owned for c in broker.commit_log), "a worker committed a partition it lost"
    assert broker.committed(GROUP, INPUT) == broker.end_offsets(INPUT)


def test_exactly_once_survives_a_failed_worker() -> None:
    broker = MemoryBroker()
    _topics(broker, 2)
    sent = _events(broker, 16, 2, poison={5: b"\xff not json"})
    settings = worker_settings(processing_guarantee="exactly_once", group_instance_id="pod-0")
    first = Running(broker, settings)
    _until(lambda: _outcomes(broker) >= 4, what="first committed transaction")
    broker.fail_next_deliveries(1)  # the next result is lost: the worker must stop
    sent.update(_events(broker, 16, 2))
    assert first.join() == 1
    assert "not delivered" in (first.worker.failure or "")
    second = Running(broker, settings)  # the restarted pod: same transactional id
    _until(lambda: _all_committed(broker), what="all offsets committed")
    assert second.stop() == 0
    ids = [r.event_id for r in _results(broker)] + [d.event_id for d in _dead(broker)]
    assert Counter(ids) == Counter(sent.values())  # each once for a read_committed reader
    assert all(c.transactional for c in broker.commit_log)


def test_broker_outage_makes_the_worker_unready_until_it_recovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The worker's reachability thresholds (5 s) are constants; shrink them for the test.
    quick = functools.partial(BrokerReachability, report_after_s=0.2)
    monkeypatch.setattr(consumer.stream.client_errors, "BrokerReachability", quick)
    broker = MemoryBroker(error_interval_s=0.05)
    _topics(broker, 2)
    _events(broker, 6, 2)
    running = Running(broker, worker_settings())
    _until(lambda: _all_committed(broker) and running.health.readiness()[0], what="ready")
    broker.set_down(True)
    _events(broker, 6, 2)
    _until(lambda: not running.health.readiness()[0], what="not ready")
    assert "cannot reach the Kafka bootstrap servers" in running.health.readiness()[1]
    assert running.worker.metrics.counts().consumed == 6
    broker.set_down(False)
    _until(lambda: running.health.readiness()[0], what="ready again")
    _until(lambda: _all_committed(broker), what="all offsets committed")
    assert running.stop() == 0
    assert len(_results(broker)) == 12


def test_authentication_failure_stops_the_worker() -> None:
    broker = MemoryBroker(error_interval_s=0.05)
    _topics(broker, 1)
    broker.fail_auth(True)
    running = Running(broker, worker_settings())
    assert running.join(5) == 1
    assert "authentication or authorization failed" in (running.worker.failure or "")
