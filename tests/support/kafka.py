"""Reading and writing the test broker, and reading a group's committed offsets."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


def produce(
    bootstrap: str,
    topic: str,
    values: list[tuple[bytes | None, bytes]],
    spread: int | None = None,
    partition_of: Callable[[int], int] | None = None,
) -> list[tuple[int, int]]:
    """Publish (key, value) pairs, round-robin over `spread` partitions or by `partition_of`.

    Returns their (partition, offset) in order.
    """
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    coords: list[tuple[int, int] | None] = [None] * len(values)

    def report(index: int):  # type: ignore[no-untyped-def]
        def delivered(err, msg) -> None:  # type: ignore[no-untyped-def]
            assert err is None, err
            coords[index] = (msg.partition(), msg.offset())

        return delivered

    for index, (key, value) in enumerate(values):
        kwargs = {}
        if spread is not None:
            kwargs["partition"] = index % spread
        elif partition_of is not None:
            kwargs["partition"] = partition_of(index)
        producer.produce(topic, key=key, value=value, on_delivery=report(index), **kwargs)
        producer.poll(0)
    assert producer.flush(30) == 0
    assert all(c is not None for c in coords)
    return [c for c in coords if c is not None]


def read(
    bootstrap: str,
    topic: str,
    expected: int,
    timeout_s: float = 60.0,
    idle_s: float = 0.0,
    until: Callable[[list[Record]], bool] | None = None,
) -> list[Record]:
    """Read from the start until `expected` records (or `until` holds), then `idle_s` more."""
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    reader.subscribe([topic])
    records: list[Record] = []
    deadline = time.monotonic() + timeout_s
    quiet_until: float | None = None
    try:
        while time.monotonic() < deadline:
            batch = reader.consume(500, timeout=0.2)
            for msg in batch:
                if msg.error() is None:
                    records.append(
                        Record(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value())
                    )
            if until(records) if until else len(records) >= expected:
                if quiet_until is None:
                    quiet_until = time.monotonic() + idle_s
                if time.monotonic() >= quiet_until:
                    break
    finally:
        reader.close()
    return records


_COORDINATOR_NOT_READY = frozenset(
    {KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS}
)


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed offset per partition (-1001 means none)."""
    client = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    wanted = [TopicPartition(topic, p) for p in range(partitions)]
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                tps = client.committed(wanted, timeout=10)
                return {tp.partition: tp.offset for tp in tps}
            except KafkaException as exc:
                # A broker that has just started answers NOT_COORDINATOR (or "load in
                # progress") while it loads __consumer_offsets: ask again, as clients do.
                error = exc.args[0] if exc.args else None
                not_ready = isinstance(error, KafkaError) and (
                    error.retriable() or error.code() in _COORDINATOR_NOT_READY
                )
                if not not_ready or time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
    finally:
        client.close()


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    client = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-{uuid.uuid4()}"})
    try:
        return {
            p: client.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(partitions)
        }
    finally:
        client.close()
