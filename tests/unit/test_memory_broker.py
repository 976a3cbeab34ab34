"""The in-memory broker alone: offsets, groups, pause, commits, transactions, faults."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from consumer.ops.metrics import lag_from_statistics
from consumer.stream.memory_broker import MemoryBroker
from consumer.stream.memory_consumer import MemoryConsumer
from consumer.stream.memory_producer import MemoryProducer


def _consumer(
    broker: MemoryBroker,
    *,
    group: str = "g",
    settings: dict[str, Any] | None = None,
    **callbacks: Any,
) -> MemoryConsumer:
    config: dict[str, Any] = {
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        "partition.assignment.strategy": "cooperative-sticky",
        **(settings or {}),
        **callbacks,
    }
    return broker.consumer(config)


def _drain(consumer: MemoryConsumer, want: int, timeout_s: float = 2.0) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got += consumer.consume(100, timeout=0.05)
    return got


class Rebalances:
    """Records rebalance callbacks: [("assign"|"revoke"|"lost", [partition, ...])]."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[int]]] = []

    def kwargs(self) -> dict[str, Any]:
        def record(kind: str) -> Any:
            return lambda _c, tps: self.seen.append((kind, [tp.partition for tp in tps]))

        return {
            "on_assign": record("assign"),
            "on_revoke": record("revoke"),
            "on_lost": record("lost"),
        }


def _until(check: Any, *consumers: MemoryConsumer, timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        for consumer in consumers:
            consumer.consume(10, timeout=0.01)


def test_records_keep_offsets_keys_headers_and_partitions() -> None:
    broker = MemoryBroker()
    broker.create_topic("t", partitions=3)
    producer = broker.producer({"enable.idempotence": True})
    reports: list[tuple[KafkaError | None, Message]] = []
    for i in range(9):
        producer.produce(
            "t",
            value=f"v{i}".encode(),
            key=b"same-key",
            headers=[("h", "x")],
            on_delivery=lambda e, m: reports.append((e, m)),
        )
    producer.produce("t", value=b"explicit", partition=2)
    assert producer.flush(1) == 0
    assert [e for e, _ in reports] == [None] * 9
    assert len({m.partition() for _, m in reports}) == 1  # one key, one partition
    assert [m.offset() for _, m in reports] == list(range(9))
    consumer = _consumer(broker)
    consumer.subscribe(["t"])
    got = _drain(consumer, 10)
    assert len(got) == 10
    first = next(m for m in got if m.key() == b"same-key")
    assert first.headers() == [("h", b"x")]
    assert first.timestamp()[0] == 1 and first.timestamp()[1] > 0
    assert broker.end_offsets("t")[2] >= 1
    # latest: a new group starts at the end
    late = _consumer(broker, group="late", settings={"auto.offset.reset": "latest"})
    late.subscribe(["t"])
    assert _drain(late, 1, timeout_s=0.2) == []
    broker.produce("t", b"new", partition=0)
    assert [m.value() for m in _drain(late, 1)] == [b"new"]


def test_consume_waits_for_records_without_spinning() -> None:
    broker = MemoryBroker()
    broker.create_topic("t")
    consumer = _consumer(broker)
    consumer.subscribe(["t"])
    _until(lambda: consumer.assignment() != [], consumer)
    threading.Timer(0.1, lambda: broker.produce("t", b"late")).start()
    started = time.monotonic()
    got = consumer.consume(10, timeout=2.0)
    waited = time.monotonic() - started
    assert [m.value() for m in got] == [b"late"]
    assert 0.05 < waited < 1.0
    started = time.monotonic()
    assert consumer.consume(10, timeout=0.1) == []
    assert time.monotonic() - started >= 0.09


def test_cooperative_rebalance_moves_only_what_it_must() -> None:
    broker = MemoryBroker()
    broker.create_topic("t", partitions=4)
    first, second = Rebalances(), Rebalances()
    a = _consumer(broker)
    a.subscribe(["t"], **first.kwargs())
    _until(lambda: len(a.assignment()) == 4, a)
    assert first.seen == [("assign", [0, 1, 2, 3])]
    b = _consumer(broker)
    b.subscribe(["t"], **second.kwargs())
    _until(lambda: len(b.assignment()) == 2, a, b)
    assert first.seen[1:] == [("revoke", [2, 3])]  # a keeps 0 and 1, nothing else moves
    assert second.seen == [("assign", [2, 3])]
    owned = broker.assignment("g")
    assert sorted(p for parts in owned.values() for _, p in parts) == [0, 1, 2, 3]
    b.close()  # b's revoke runs in close(), then a gets them back
    assert second.seen[-1] == ("revoke", [2, 3])
    _until(lambda: len(a.assignment()) == 4, a)
    assert first.seen[-1] == ("assign", [2, 3])


def test_new_owner_waits_for_the_old_owner_to_revoke_and_commit() -> None:
    broker = MemoryBroker()
    broker.create_topic("t", partitions=2)
    for i in range(10):
        broker.produce("t", str(i).encode(), partition=i % 2)
    a = _consumer(broker)

    def commit_on_revoke(consumer: MemoryConsumer, tps: list[TopicPartition]) -> None:
        offsets = [TopicPartition(t.topic, t.partition, 3) for t in tps]
        consumer.commit(offsets=offsets, asynchronous=False)

    a.subscribe(["t"], on_revoke=commit_on_revoke)
    assert len(_drain(a, 10)) == 10
    b = _consumer(broker)
    b.subscribe(["t"])
    # b is not assigned until a ran its revoke (a must poll for that)
    assert b.consume(10, timeout=0.05) == [] and b.assignment() == []
    got: list[Message] = []
    deadline = time.monotonic() + 2
    while len(got) < 2 and time.monotonic() < deadline:
        a.consume(10, timeout=0.01)
        got += b.consume(10, timeout=0.01)
    assert [m.offset() for m in got] == [3, 4]  # from a's commit in its revoke
    assert all(c.owned for c in broker.commit_log)


def test_eager_strategy_revokes_everything_first() -> None:
    broker = MemoryBroker()
    broker.create_topic("t", partitions=2)
    first = Rebalances()
    a = _consumer(broker, settings={"partition.assignment.strategy": "range"})
    a.subscribe(["t"], **first.kwargs())
    _until(lambda: len(a.assignment()) == 2, a)
    b = _consumer(broker, settings={"partition.assignment.strategy": "range"})
    b.subscribe(["t"])
    _until(lambda: len(b.assignment()) == 1 and len(a.assignment()) == 1, a, b)
    assert first.seen == [("assign", [0, 1]), ("revoke", [0, 1]), ("assign", [0])]


def test_pause_resume_and_pause_outliving_the_assignment() -> None:
    broker = MemoryBroker()
    broker.create_topic("t", partitions=2)
    c = _consumer(broker)
    c.subscribe(["t"])
    _until(lambda: len(c.assignment()) == 2, c)
    for i in range(4):
        broker.produce("t", str(i).encode(), partition=i % 2)
    c.pause([TopicPartition("t", 0)])
    got = _drain(c, 4, timeout_s=0.2)
    assert {m.partition() for m in got} == {1}
    c.resume([TopicPartition("t", 0)])
    assert {m.partition() for m in _drain(c, 2)} == {0}
    c.pause(c.assignment())
    c.unsubscribe()
    assert c.paused() == [("t", 0), ("t", 1)]  # librdkafka keeps the flag, so do we


def test_commits_sync_async_and_on_commit_reports() -> None:
    broker = MemoryBroker()
    broker.create_topic("t", partitions=2)
    reports: list[tuple[KafkaError | None, list[TopicPartition]]] = []
    c = _consumer(broker, on_commit=lambda e, ps: reports.append((e, ps)))
    c.subscribe(["t"])
    _until(lambda: len(c.assignment()) == 2, c)
    assert c.commit(offsets=[TopicPartition("t", 0, 5)], asynchronous=True) is None
    done = c.commit(offsets=[TopicPartition("t", 1, 7)], asynchronous=False)
    assert done is not None and [(tp.partition, tp.offset) for tp in done] == [(1, 7)]
    assert reports == []  # served by the next consume
    c.consume(1, timeout=0)
    # Only the asynchronous commit is reported: confluent-kafka-python queues no on_commit
    # report for a synchronous one (checked against the real broker).
    assert [(e, [tp.offset for tp in ps]) for e, ps in reports] == [(None, [5])]
    assert broker.committed("g", "t") == {0: 5, 1: 7}
    got = c.committed([TopicPartition("t", 0), TopicPartition("t", 1)])
    assert [tp.offset for tp in got] == [5, 7]
    with pytest.raises(KafkaException):
        c.commit(asynchronous=False)  # nothing stored: _NO_OFFSET
    broker.set_down(True)
    with pytest.raises(KafkaException):
        c.commit(offsets=[TopicPartition("t", 0, 6)], asynchronous=False)
    c.commit(offsets=[TopicPartition("t", 0, 6)], asynchronous=True)
    c.consume(1, timeout=0)
    assert reports[-1][0] is not None and broker.committed("g", "t")[0] == 5


def _txn_producer(broker: MemoryBroker, tid: str = "tx", **extra: Any) -> MemoryProducer:
    producer = broker.producer({"transactional.id": tid, **extra})
    producer.init_transactions(1)
    return producer


def test_transactions_are_visible_to_read_committed_only_once_committed() -> None:
    broker = MemoryBroker()
    broker.create_topic("in")
    broker.create_topic("out")
    for i in range(3):
        broker.produce("in", str(i).encode())
    source = _consumer(broker, group="app")
    source.subscribe(["in"])
    assert len(_drain(source, 3)) == 3
    producer = _txn_producer(broker)
    producer.begin_transaction()
    producer.produce("out", b"a")
    producer.produce("out", b"b")
    producer.send_offsets_to_transaction(
        [TopicPartition("in", 0, 3)], source.consumer_group_metadata(), 1
    )
    broker.produce("out", b"plain")  # after the open transaction: held back too
    assert broker.records("out", read_committed=True) == []
    assert len(broker.records("out", read_committed=False)) == 3
    assert broker.committed("app", "in") == {}  # offsets go with the commit
    producer.commit_transaction(1)
    assert [m.value() for m in broker.records("out")] == [b"a", b"b", b"plain"]
    assert broker.committed("app", "in") == {0: 3}
    assert broker.commit_log[-1].transactional and broker.commit_log[-1].owned
    producer.begin_transaction()
    producer.produce("out", b"aborted")
    producer.abort_transaction()
    assert b"aborted" not in [m.value() for m in broker.records("out")]
    assert b"aborted" in [m.value() for m in broker.records("out", read_committed=False)]
    # markers take offsets and are never delivered
    assert sum(r.control for r in broker.stored("out", 0)) == 2
    reader = _consumer(broker, group="reader")
    reader.subscribe(["out"])
    assert [m.value() for m in _drain(reader, 4, timeout_s=0.3)] == [b"a", b"b", b"plain"]


def test_a_failed_delivery_makes_the_transaction_abortable() -> None:
    broker = MemoryBroker()
    producer = _txn_producer(broker)
    producer.begin_transaction()
    broker.fail_next_deliveries(1, KafkaError.NOT_ENOUGH_REPLICAS)
    errors: list[KafkaError | None] = []
    producer.produce("out", b"x", on_delivery=lambda e, _m: errors.append(e))
    with pytest.raises(KafkaException) as raised:
        producer.commit_transaction(1)
    assert raised.value.args[0].txn_requires_abort()
    assert errors[0] is not None and errors[0].code() == KafkaError.NOT_ENOUGH_REPLICAS
    producer.abort_transaction(1)
    producer.begin_transaction()  # usable again


def test_second_producer_with_the_same_transactional_id_fences_the_first() -> None:
    broker = MemoryBroker()
    errors: list[KafkaError] = []
    old = _txn_producer(broker, error_cb=errors.append)
    old.begin_transaction()
    old.produce("out", b"zombie")
    new = _txn_producer(broker)
    assert broker.records("out", read_committed=False)[0].value() == b"zombie"
    assert broker.records("out") == []  # the zombie's transaction was aborted
    old.poll(0)
    assert errors and errors[0].fatal() and errors[0].code() == KafkaError._FENCED
    with pytest.raises(KafkaException) as raised:
        old.commit_transaction(1)
    assert raised.value.args[0].fatal()
    with pytest.raises(KafkaException):
        old.produce("out", b"more")
    new.begin_transaction()
    new.produce("out", b"fresh")
    new.commit_transaction(1)
    assert [m.value() for m in broker.records("out")] == [b"fresh"]


def test_zombie_member_cannot_send_offsets_to_a_transaction() -> None:
    broker = MemoryBroker()
    broker.create_topic("in")
    c = _consumer(broker)
    c.subscribe(["in"])
    _until(lambda: c.memberid() is not None, c)
    metadata = c.consumer_group_metadata()
    broker.evict(c)
    producer = _txn_producer(broker)
    producer.begin_transaction()
    with pytest.raises(KafkaException) as raised:
        producer.send_offsets_to_transaction([TopicPartition("in", 0, 1)], metadata, 1)
    assert raised.value.args[0].txn_requires_abort()


def test_broker_down_holds_deliveries_and_reports_transport_errors() -> None:
    broker = MemoryBroker(error_interval_s=0.02)
    broker.create_topic("t")
    errors: list[KafkaError] = []
    consumer = _consumer(broker, error_cb=errors.append)
    consumer.subscribe(["t"])
    _until(lambda: consumer.assignment() != [], consumer)
    producer = broker.producer({"error_cb": errors.append, "message.timeout.ms": 150})
    reports: list[KafkaError | None] = []
    broker.set_down(True)
    producer.produce("t", b"waits", on_delivery=lambda e, _m: reports.append(e))
    assert producer.poll(0.05) >= 1 and reports == []  # only errors so far
    assert consumer.consume(10, timeout=0.05) == []
    codes = {e.code() for e in errors}
    assert {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN} <= codes
    broker.set_down(False)
    assert producer.flush(1) == 0 and reports == [None]
    assert [m.value() for m in _drain(consumer, 1)] == [b"waits"]
    broker.set_down(True)
    producer.produce("t", b"lost", on_delivery=lambda e, _m: reports.append(e))
    assert producer.flush(1) == 0  # timed out, not delivered
    assert reports[-1] is not None and reports[-1].code() == KafkaError._MSG_TIMED_OUT


def test_auth_failure_reaches_error_cb_and_blocks_the_group() -> None:
    broker = MemoryBroker(error_interval_s=0.02)
    broker.create_topic("t")
    broker.fail_auth(True)
    errors: list[KafkaError] = []
    consumer = _consumer(broker, error_cb=errors.append)
    consumer.subscribe(["t"])
    consumer.consume(1, timeout=0.05)
    assert errors and errors[0].code() == KafkaError._AUTHENTICATION
    assert "SASL authentication error" in errors[0].str()
    assert consumer.memberid() is None


def test_delivery_faults_duplicates_and_held_acks() -> None:
    broker = MemoryBroker()
    broker.create_topic("t")
    plain = broker.producer({})
    idempotent = broker.producer({"enable.idempotence": True})
    broker.duplicate_next_deliveries(2)
    plain.produce("t", b"dup")
    idempotent.produce("t", b"once")
    assert [m.value() for m in broker.records("t")] == [b"dup", b"dup", b"once"]
    reports: list[KafkaError | None] = []
    broker.hold_deliveries(True)
    plain.produce("t", b"held", on_delivery=lambda e, _m: reports.append(e))
    assert plain.poll(0.05) == 0 and len(plain) == 1
    broker.hold_deliveries(False)
    assert plain.poll(0) == 1 and reports == [None]
    broker.set_ack_delay(0.05)
    started = time.monotonic()
    plain.produce("t", b"slow", on_delivery=lambda e, _m: reports.append(e))
    assert plain.flush(1) == 0 and time.monotonic() - started >= 0.045
    broker.set_ack_delay(0)
    broker.fail_next_deliveries(1)
    plain.produce("t", b"fails", on_delivery=lambda e, _m: reports.append(e))
    plain.flush(1)
    assert reports[-1] is not None and reports[-1].code() == KafkaError._MSG_TIMED_OUT
    plain.purge()  # nothing pending: no-op
    plain.close()
    with pytest.raises(RuntimeError):
        plain.produce("t", b"closed")


def test_evicted_member_loses_its_partitions_and_rejoins() -> None:
    broker = MemoryBroker()
    broker.create_topic("t", partitions=2)
    seen = Rebalances()
    errors: list[KafkaError] = []
    c = _consumer(broker, error_cb=errors.append)
    c.subscribe(["t"], **seen.kwargs())
    _until(lambda: len(c.assignment()) == 2, c)
    member = c.memberid()
    broker.evict(c)
    _until(lambda: len(c.assignment()) == 2 and c.memberid() not in (None, member), c)
    assert seen.seen == [("assign", [0, 1]), ("lost", [0, 1]), ("assign", [0, 1])]
    assert errors[0].code() == KafkaError.UNKNOWN_MEMBER_ID


def test_static_member_rejoins_without_moving_partitions() -> None:
    broker = MemoryBroker()
    broker.create_topic("t", partitions=2)
    a = _consumer(broker, settings={"group.instance.id": "pod-a"})
    a.subscribe(["t"])
    b_seen = Rebalances()
    b = _consumer(broker, settings={"group.instance.id": "pod-b"})
    b.subscribe(["t"], **b_seen.kwargs())
    _until(lambda: len(a.assignment()) == 1 and len(b.assignment()) == 1, a, b)
    mine = a.assignment()
    a.close()
    b.consume(1, timeout=0.05)
    assert len(b.assignment()) == 1  # no rebalance: pod-a's slot waits for it
    again = _consumer(broker, settings={"group.instance.id": "pod-a"})
    again.subscribe(["t"])
    _until(lambda: again.assignment() != [], again)
    assert again.assignment() == mine and b_seen.seen == [("assign", [1])]


def test_missed_max_poll_interval_evicts_the_member() -> None:
    broker = MemoryBroker()
    broker.create_topic("t", partitions=2)
    slow = _consumer(broker, settings={"max.poll.interval.ms": 100})
    slow.subscribe(["t"])
    _until(lambda: len(slow.assignment()) == 2, slow)
    fast = _consumer(broker)
    fast.subscribe(["t"])
    time.sleep(0.15)  # slow does not poll
    _until(lambda: len(fast.assignment()) == 2, fast)


def test_statistics_give_the_worker_its_lag() -> None:
    broker = MemoryBroker()
    broker.create_topic("t")
    for i in range(5):
        broker.produce("t", str(i).encode())
    stats: list[str] = []
    c = _consumer(broker, stats_cb=stats.append, settings={"statistics.interval.ms": 20})
    c.subscribe(["t"])
    _until(lambda: c.assignment() != [], c)
    c.commit(offsets=[TopicPartition("t", 0, 2)], asynchronous=False)
    stats.clear()
    _until(lambda: bool(stats), c)
    assert lag_from_statistics(stats[-1]) == {("t", 0): 3}
    assert json.loads(stats[-1])["brokers"]
