"""The Publisher on the in-memory broker: an offset is done only once its outcome is acked."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from consumer.ops.metrics import HealthState, WorkerMetrics
from consumer.stream.failure import Failure
from consumer.stream.memory_broker import MemoryBroker
from consumer.stream.offsets import OffsetTracker
from consumer.stream.publisher import Publisher
from consumer.stream.records import InputRecord, Outcome

INPUT, OUTPUT, DEAD = "frames", "emotions", "dead-letters"
TP = (INPUT, 0)


class Setup:
    def __init__(self, queue_max: int = 100_000) -> None:
        self.broker = MemoryBroker()
        for topic in (INPUT, OUTPUT, DEAD):
            self.broker.create_topic(topic, 1)
        self.tracker = OffsetTracker()
        self.tracker.assign(TP)
        self.metrics = WorkerMetrics()
        self.failure = Failure()
        self.reached = 0
        producer = self.broker.producer_factory(
            {"enable.idempotence": True, "queue.buffering.max.messages": queue_max}
        )
        self.publisher = Publisher(
            producer,
            self.tracker,
            self.metrics,
            HealthState(60, 300),
            self.failure,
            on_delivered=self._reached,
        )

    def _reached(self) -> None:
        self.reached += 1

    def outcomes(self, count: int, dead: frozenset[int] = frozenset()) -> list[Outcome]:
        made = []
        for offset in range(count):
            record = InputRecord(INPUT, 0, offset, None, b"{}", timestamp_ms=1_000)
            self.tracker.track(TP, offset)
            is_dead = offset in dead
            made.append(
                Outcome(
                    record,
                    DEAD if is_dead else OUTPUT,
                    f"k{offset}".encode(),
                    json.dumps({"offset": offset}).encode(),
                    is_dead,
                    label="not_json" if is_dead else "ok",
                    captured_at=datetime(2026, 1, 1, tzinfo=UTC),
                )
            )
        return made

    def published(self, topic: str) -> list[int]:
        return [json.loads(m.value() or b"")["offset"] for m in self.broker.records(topic)]


def test_offsets_are_done_only_after_the_broker_acknowledges() -> None:
    s = Setup()
    s.broker.hold_deliveries(True)
    s.publisher.publish(s.outcomes(4, dead=frozenset({2})))
    s.publisher.serve(0.05)
    assert s.tracker.committable() == {} and s.tracker.in_flight() == 4
    s.broker.hold_deliveries(False)
    s.publisher.flush(2.0)
    assert s.tracker.committable() == {TP: 4} and s.tracker.in_flight() == 0
    assert s.published(OUTPUT) == [0, 1, 3] and s.published(DEAD) == [2]
    counts = s.metrics.counts()
    assert (counts.results, counts.dead_letters, counts.dropped) == (3, 1, 0)
    assert s.reached == 4  # each acknowledgement is a sign of a live broker
    assert s.publisher.produced_since_commit == 4


def test_a_failed_delivery_fails_the_worker_and_leaves_the_offset_undone() -> None:
    s = Setup()
    s.broker.fail_next_deliveries(1)
    s.publisher.publish(s.outcomes(3))
    s.publisher.flush(2.0)
    assert s.failure.reason is not None and "frames[0]@0 was not delivered" in s.failure.reason
    assert s.tracker.committable() == {}  # 1 and 2 are acknowledged, 0 is not
    assert s.metrics.counts().results == 2


def test_outcomes_of_a_revoked_partition_are_dropped_not_produced() -> None:
    s = Setup()
    outcomes = s.outcomes(3)
    s.tracker.revoke(TP)
    s.publisher.publish(outcomes)
    s.publisher.flush(2.0)
    assert s.published(OUTPUT) == []
    assert s.metrics.counts().dropped == 3
    assert s.publisher.produced_since_commit == 0


def test_a_full_local_queue_waits_for_deliveries_instead_of_losing_outcomes() -> None:
    s = Setup(queue_max=2)
    s.broker.set_ack_delay(0.01)
    s.publisher.publish(s.outcomes(7))
    s.publisher.flush(2.0)
    assert s.published(OUTPUT) == list(range(7))
    assert s.tracker.committable() == {TP: 7}
