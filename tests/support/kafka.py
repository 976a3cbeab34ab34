"""Reading and writing the test broker, and reading a group's committed offsets.

Readers read with isolation.level=read_committed, named rather than left to librdkafka's
default: results of a transaction the worker aborted, or left open when it was killed,
must never count as results.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

# Offsets a group has committed nothing for (librdkafka's OFFSET_INVALID).
NO_COMMIT = -1001


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    # The record's timestamp (CreateTime: the producing process's clock), ms since the epoch.
    timestamp_ms: int = 0
    headers: tuple[tuple[str, bytes | None], ...] = ()


def produce(
    bootstrap: str,
    topic: str,
    values: list[tuple[bytes | None, bytes]],
    spread: int | None = None,
    partition_of: Callable[[int], int] | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> list[tuple[int, int]]:
    """Publish (key, value) pairs, round-robin over `spread` partitions or by `partition_of`,
    each with `headers` if given.

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
        kwargs: dict[str, Any] = {"headers": headers} if headers else {}
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
    """Read from the start until `expected` records (or `until` holds), then `idle_s` more.

    A wait, not a proof: it returns what it saw by the timeout, which is nothing at all
    while its group is still being assigned. To show that nothing (more) arrived, compare
    end offsets or use read_to_end().
    """
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
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
                    records.append(_record(msg))
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
    """The group's committed offset per partition (NO_COMMIT, -1001, means none).

    Offsets of committed transactions only: read_uncommitted here makes the broker answer
    at once with the stable offsets while a transaction that also commits offsets is open
    (a worker just killed in exactly_once mode leaves one until it is fenced or times out);
    read_committed would make it answer UNSTABLE_OFFSET_COMMIT until then.
    """
    client = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "isolation.level": "read_uncommitted"}
    )
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
    """Each partition's high watermark: the offset the next record written will get.

    Every record written counts, those of aborted or open transactions too; `== {0: 0}`
    after the writer has exited proves that it wrote nothing, with no wait involved.
    """
    client = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"probe-{uuid.uuid4()}",
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        return {
            p: client.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(partitions)
        }
    finally:
        client.close()


def _record(msg) -> Record:  # type: ignore[no-untyped-def]
    return Record(
        msg.topic(),
        msg.partition(),
        msg.offset(),
        msg.key(),
        msg.value(),
        msg.timestamp()[1],
        tuple(msg.headers() or ()),
    )


class TopicReader:
    """Reads whole topics from their first offset with assign(): no group, no assignment wait.

    read_committed, so "the end" of a partition is its last stable offset. catch_up() reads
    to the end offsets as they are when it is called: what it has then is everything the
    topics held at that moment, not whatever a reader happened to see within a few seconds.
    One reader can be kept and caught up again; it only reads what is new.
    """

    def __init__(self, bootstrap: str, topics: list[str], timeout_s: float = 30.0) -> None:
        self.records: list[Record] = []
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"reader-{uuid.uuid4()}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
            }
        )
        self._next: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + timeout_s
        for topic in topics:
            while True:
                meta = self._consumer.list_topics(topic, timeout=10).topics[topic]
                if meta.error is None and meta.partitions:
                    break
                if time.monotonic() >= deadline:
                    self.close()
                    raise AssertionError(f"topic {topic} has no partitions: {meta.error}")
                time.sleep(0.2)
            for partition in meta.partitions:
                self._next[(topic, partition)] = 0
        self._consumer.assign(
            [TopicPartition(t, p, OFFSET_BEGINNING) for t, p in sorted(self._next)]
        )

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._consumer.close()

    def of(self, topic: str) -> list[Record]:
        return [r for r in self.records if r.topic == topic]

    def poll(self, timeout_s: float = 0.2) -> None:
        for msg in self._consumer.consume(1000, timeout=timeout_s):
            error = msg.error()
            where = (str(msg.topic()), int(msg.partition() or 0))
            offset = int(msg.offset() or 0)
            if error is None:
                self.records.append(_record(msg))
                self._next[where] = max(self._next[where], offset + 1)
            elif error.code() == KafkaError._PARTITION_EOF:
                self._next[where] = max(self._next[where], offset)  # the end offset
            else:
                raise KafkaException(error)

    def end_offsets(self, timeout_s: float = 30.0) -> dict[tuple[str, int], int]:
        """Each partition's last stable offset (read_committed), now."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return {
                    tp: self._consumer.get_watermark_offsets(TopicPartition(*tp), timeout=10)[1]
                    for tp in self._next
                }
            except KafkaException as exc:  # e.g. no leader yet, just after a broker restart
                error = exc.args[0] if exc.args else None
                retriable = isinstance(error, KafkaError) and error.retriable()
                if not retriable or time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def catch_up(self, timeout_s: float = 30.0) -> list[Record]:
        """Read up to the end offsets of now; fail if they cannot be reached in time."""
        target = self.end_offsets()
        deadline = time.monotonic() + timeout_s
        while any(self._next[tp] < end for tp, end in target.items()):
            if time.monotonic() >= deadline:
                behind = {f"{t}:{p}": (self._next[(t, p)], e) for (t, p), e in target.items()}
                raise AssertionError(f"reader did not reach the end offsets: {behind}")
            self.poll()
        return self.records

    def wait(self, until: Callable[[list[Record]], bool], timeout_s: float) -> bool:
        """Read until `until(records)` holds (True) or the timeout (False)."""
        deadline = time.monotonic() + timeout_s
        while not until(self.records):
            if time.monotonic() >= deadline:
                return False
            self.poll()
        return True


def read_to_end(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[Record]:
    """Every committed record of `topic` up to its end offsets of now (no waiting for more)."""
    with TopicReader(bootstrap, [topic]) as reader:
        return reader.catch_up(timeout_s)


def commit_progress(before: Mapping[int, int], after: Mapping[int, int]) -> int:
    """How many offsets the group's commits moved forward from `before` to `after`.

    Negative if they moved back anywhere (a partition with no commit counts as offset 0).
    """
    moved = 0
    for partition in set(before) | set(after):
        old = max(before.get(partition, NO_COMMIT), 0)
        new = max(after.get(partition, NO_COMMIT), 0)
        if new < old:
            return -1
        moved += new - old
    return moved


def wait_for_commit_progress(
    read_committed: Callable[[], dict[int, int]],
    before: Mapping[int, int],
    timeout_s: float,
    running: Callable[[], bool] = lambda: True,
    every_s: float = 0.3,
) -> dict[int, int]:
    """Wait until the committed offsets move forward from `before`: commits during processing.

    Fails if they move back, if `running()` turns false first, or at the timeout: a worker
    that commits only when it shuts down never gets past this while it runs.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        now = read_committed()
        moved = commit_progress(before, now)
        if moved < 0:
            raise AssertionError(f"committed offsets moved back: {dict(before)} -> {now}")
        if moved > 0:
            return now
        if not running():
            raise AssertionError(f"the worker stopped without committing past {dict(before)}")
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"no commit in {timeout_s:.0f} s while the worker ran: still {now}, "
                f"before {dict(before)}"
            )
        time.sleep(every_s)
