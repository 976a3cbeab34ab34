"""The commit policy on the in-memory broker: when it commits, and what."""

from __future__ import annotations

import time
from typing import Any

import pytest
from confluent_kafka import Consumer

from consumer.config import KafkaSettings
from consumer.ops.metrics import HealthState, WorkerMetrics
from consumer.stream.commit_policy import CommitPolicy
from consumer.stream.committer import OffsetCommitter, TransactionCommitter
from consumer.stream.failure import Failure
from consumer.stream.memory_broker import MemoryBroker
from consumer.stream.offsets import OffsetTracker
from consumer.stream.publisher import Publisher
from consumer.stream.records import InputRecord, Outcome

INPUT, OUTPUT, GROUP = "frames", "emotions", "workers"
TP = (INPUT, 0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Setup:
    """A consumer that owns frames[0], a publisher and a policy, on one broker."""

    def __init__(self, *, exactly_once: bool = False, **kafka: Any) -> None:
        self.broker = MemoryBroker()
        self.broker.create_topic(INPUT, 1)
        self.broker.create_topic(OUTPUT, 1)
        self.consumer = self._assigned_consumer()
        config: dict[str, object] = {"enable.idempotence": True}
        if exactly_once:
            config["transactional.id"] = "pod-0"
        producer = self.broker.producer_factory(config)
        self.tracker = OffsetTracker()
        self.tracker.assign(TP)
        self.metrics = WorkerMetrics()
        self.failure = Failure()
        self.publisher = Publisher(
            producer,
            self.tracker,
            self.metrics,
            HealthState(60, 300),
            self.failure,
            on_delivered=lambda: None,
        )
        committer = (
            TransactionCommitter(self.consumer, producer)
            if exactly_once
            else OffsetCommitter(self.consumer)
        )
        committer.start()
        self.clock = Clock()
        settings = KafkaSettings(
            bootstrap_servers="memory:9092",
            group_id=GROUP,
            input_topic=INPUT,
            output_topic=OUTPUT,
            **kafka,
        )
        self.policy = CommitPolicy(
            settings,
            self.tracker,
            committer,
            self.publisher,
            self.metrics,
            self.failure,
            self.clock,
        )
        self.next_offset = 0

    def _assigned_consumer(self) -> Consumer:
        consumer = self.broker.consumer_factory(
            {
                "group.id": GROUP,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "partition.assignment.strategy": "cooperative-sticky",
                "on_commit": lambda error, partitions: self.policy.on_commit(error, partitions),
            }
        )
        consumer.subscribe([INPUT])
        deadline = time.monotonic() + 5
        while not consumer.assignment():
            assert time.monotonic() < deadline, "no assignment"
            consumer.consume(1, timeout=0.02)
        return consumer

    def publish(self, count: int) -> None:
        """Track `count` more input offsets and publish their results."""
        outcomes = []
        for _ in range(count):
            offset = self.next_offset
            self.next_offset += 1
            self.tracker.track(TP, offset)
            record = InputRecord(INPUT, 0, offset, None, b"{}")
            outcomes.append(Outcome(record, OUTPUT, None, b"{}", False, label="ok"))
        self.publisher.publish(outcomes)

    def committed(self) -> dict[int, int]:
        return self.broker.committed(GROUP, INPUT)

    def serve_commit_reports(self) -> None:
        self.policy.await_reports(self.consumer, time.monotonic() + 2)


def _commits(s: Setup, outcome: str) -> float | None:
    return s.metrics.registry.get_sample_value("emotion_worker_commits_total", {"outcome": outcome})


def test_due_after_the_interval_or_after_enough_done_events() -> None:
    s = Setup(commit_interval_s=5.0, commit_every=3)
    assert not s.policy.due()
    s.clock.now += 5.0
    assert s.policy.due()
    s.policy.commit()  # nothing done: nothing sent, but the interval starts again
    assert not s.policy.due() and s.broker.commit_log == []
    s.publish(2)
    s.publisher.flush(2.0)
    assert not s.policy.due()
    s.publish(1)
    s.publisher.flush(2.0)
    assert s.policy.due()  # three acknowledged since the last commit


def test_commits_only_the_acknowledged_prefix() -> None:
    s = Setup()
    s.publish(3)
    s.publisher.flush(2.0)
    s.broker.hold_deliveries(True)
    s.publish(2)  # produced, not acknowledged
    s.policy.commit(wait=True)
    assert s.committed() == {0: 3}
    s.broker.hold_deliveries(False)
    s.publisher.flush(2.0)
    s.policy.commit()  # asynchronous: confirmed by an on_commit report
    s.serve_commit_reports()
    assert s.committed() == {0: 5}
    assert _commits(s, "ok") == 2


def test_a_failed_asynchronous_commit_is_sent_again() -> None:
    s = Setup()
    s.publish(2)
    s.publisher.flush(2.0)
    s.broker.set_down(True)
    s.policy.commit()
    s.serve_commit_reports()  # the on_commit report carries the failure
    assert s.committed() == {}
    assert _commits(s, "failed") == 1
    s.broker.set_down(False)
    s.policy.commit()  # nothing new is done, yet the failed offsets go again
    s.serve_commit_reports()
    assert s.committed() == {0: 2}


def test_a_failing_worker_commits_nothing_more() -> None:
    s = Setup()
    s.publish(2)
    s.publisher.flush(2.0)
    s.failure.fail("a result was not delivered")
    s.policy.commit(wait=True)
    assert s.committed() == {} and s.broker.commit_log == []


def test_exactly_once_commits_the_transaction_with_its_offsets() -> None:
    s = Setup(exactly_once=True)
    s.policy.commit()
    assert s.broker.commit_log == []  # nothing produced: no empty transaction
    s.broker.set_ack_delay(0.01)
    s.publish(3)
    s.policy.commit()  # flushes first: the transaction holds all three results
    assert s.committed() == {0: 3}
    assert all(c.transactional for c in s.broker.commit_log)
    assert len(s.broker.records(OUTPUT, read_committed=True)) == 3
    assert s.publisher.produced_since_commit == 0


def test_a_fenced_transaction_fails_the_worker() -> None:
    s = Setup(exactly_once=True)
    s.publish(1)
    # A second incarnation with the same transactional id fences this one.
    successor = s.broker.producer_factory({"transactional.id": "pod-0"})
    TransactionCommitter(s.consumer, successor).start()
    s.policy.commit()
    assert s.failure.reason is not None and "transaction" in s.failure.reason
    assert s.committed() == {}
    assert _commits(s, "failed") == 1


def test_a_transactional_call_that_hangs_past_its_timeout_ends_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """librdkafka can block in send_offsets_to_transaction far past its timeout after a
    broker restart (found by the chaos soak): the watchdog exits instead of hanging. The
    hang is simulated (a sleep); the exit is recorded instead of taken."""
    import threading

    from consumer.stream import committer

    exits: list[tuple[str, float]] = []
    fired = threading.Event()

    def record(call: str, limit_s: float) -> None:
        exits.append((call, limit_s))
        fired.set()

    monkeypatch.setattr(committer, "_exit_hung", record)
    monkeypatch.setattr(committer, "HUNG_CALL_GRACE_S", 0.05)
    with committer._watchdog("quick", 0.05):
        pass  # returns in time: the timer is cancelled
    with committer._watchdog("send_offsets_to_transaction", 0.05):
        assert fired.wait(5.0)  # a call still running past 0.05 + 0.05 s
    time.sleep(0.2)
    assert exits == [("send_offsets_to_transaction", pytest.approx(0.1))]
