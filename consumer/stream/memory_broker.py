"""An in-memory Kafka broker behind the confluent-kafka surface the worker uses.

`MemoryBroker` holds topics of N partitions (records with key, value, headers and a
timestamp at increasing offsets), consumer groups (committed offsets, members, cooperative
or eager rebalances: consumer.stream.memory_groups) and transactions (records of an open
transaction are invisible to read_committed readers, aborted ones never visible, offsets
sent with a transaction are committed with it; a second producer initialising the same
transactional.id fences the first). Its clients (consumer.stream.memory_consumer and
memory_producer) take the librdkafka config dict the worker builds, so the worker runs
unchanged on it:

    broker = MemoryBroker()
    broker.create_topic("frames", partitions=3)
    Worker(settings, engine, consumer_factory=broker.consumer_factory,
           producer_factory=broker.producer_factory, decoder=...)

Injectable faults: `set_down` (no fetches, transport errors to error_cb, deliveries wait
and time out after message.timeout.ms), `fail_auth` (SASL authentication errors),
`hold_deliveries` / `set_ack_delay` (slow acknowledgements), `fail_next_deliveries`,
`duplicate_next_deliveries` (what idempotence protects from) and `evict` (a member
thrown out of its group: its partitions are lost). One lock guards everything; clients
wait on its condition and run their callbacks outside it, on the calling thread, from
consume()/poll()/flush() like librdkafka.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, Message, Producer

from consumer.stream.memory_consumer import MemoryConsumer
from consumer.stream.memory_groups import TP, Group, Member
from consumer.stream.memory_log import (
    CommitRecord,
    GroupMetadata,
    Headers,
    Partition,
    StoredRecord,
    Transaction,
)
from consumer.stream.memory_producer import MemoryProducer

__all__ = ["CommitRecord", "GroupMetadata", "MemoryBroker", "StoredRecord", "Transaction"]


class MemoryBroker:
    def __init__(
        self,
        *,
        default_partitions: int = 1,
        auto_create_topics: bool = True,
        error_interval_s: float = 0.5,
        address: str = "memory:9092",
    ) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.default_partitions = default_partitions
        self.auto_create_topics = auto_create_topics
        self.error_interval_s = error_interval_s  # how often clients hear of a fault
        self.address = address
        self.consumers: list[MemoryConsumer] = []
        self.producers: list[MemoryProducer] = []
        self.commit_log: list[CommitRecord] = []
        self.down = False
        self.auth_failing = False
        self.holding = False
        self.ack_delay_s = 0.0
        self._topics: dict[str, list[Partition]] = {}
        self._groups: dict[str, Group] = {}
        self._transactional: dict[str, MemoryProducer] = {}
        self._delivery_faults: deque[int] = deque()
        self._duplicates = 0
        self._seq = 0
        self._next_partition: dict[str, int] = {}

    # ---- clients -------------------------------------------------------------------------

    def consumer(self, config: dict[str, Any]) -> MemoryConsumer:
        client = MemoryConsumer(self, config)
        with self.lock:
            self.consumers.append(client)
        return client

    def producer(self, config: dict[str, Any]) -> MemoryProducer:
        client = MemoryProducer(self, config)
        with self.lock:
            self.producers.append(client)
        return client

    @property
    def consumer_factory(self) -> Callable[[dict[str, Any]], Consumer]:
        """For Worker(consumer_factory=...): the same surface, typed as the real client."""
        return cast(Callable[[dict[str, Any]], Consumer], self.consumer)

    @property
    def producer_factory(self) -> Callable[[dict[str, Any]], Producer]:
        return cast(Callable[[dict[str, Any]], Producer], self.producer)

    # ---- topics and inspection -----------------------------------------------------------

    def create_topic(self, name: str, partitions: int = 1) -> None:
        with self.lock:
            if name in self._topics:
                raise ValueError(f"topic {name} already exists")
            self._topics[name] = [Partition() for _ in range(partitions)]
            for group in self._groups.values():
                if any(name in m.topics for m in group.members.values()):
                    group.rebalance(self.partitions)
            self.changed.notify_all()

    def partitions(self, topic: str) -> int:
        with self.lock:
            return len(self._topics.get(topic, ()))

    def end_offsets(self, topic: str) -> dict[int, int]:
        with self.lock:
            return {p: part.end() for p, part in enumerate(self._topics.get(topic, []))}

    def records(
        self, topic: str, partition: int | None = None, *, read_committed: bool = True
    ) -> list[Message]:
        """What a reader from the start would get now, partition by partition."""
        with self.lock:
            out = []
            for p, part in enumerate(self._topics.get(topic, [])):
                if partition is not None and p != partition:
                    continue
                end = part.stable_end() if read_committed else part.end()
                visible = [r for r in part.records[:end] if r.visible(read_committed)]
                out += [r.message(topic, p) for r in visible]
            return out

    def stored(self, topic: str, partition: int) -> list[StoredRecord]:
        """The raw log of one partition, markers and aborted records included."""
        with self.lock:
            return list(self._topics[topic][partition].records)

    def committed(self, group: str, topic: str) -> dict[int, int]:
        with self.lock:
            found = self._groups.get(group)
            offsets = found.committed if found else {}
            return {p: o for (t, p), o in sorted(offsets.items()) if t == topic}

    def assignment(self, group: str) -> dict[str, list[TP]]:
        """Member id -> partitions it owns now."""
        with self.lock:
            found = self._groups.get(group)
            members = found.members.values() if found else []
            return {m.member_id: sorted(m.owned) for m in members}

    def produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Headers | None = None,
    ) -> tuple[int, int]:
        """Append one record directly (test input); returns (partition, offset)."""
        with self.lock:
            chosen = self._partition_for(topic, key, -1 if partition is None else partition)
            if isinstance(chosen, KafkaError):
                raise ValueError(chosen.str())
            record = self._append(topic, chosen, key, value, headers, None)
            return chosen, record.offset

    # ---- faults --------------------------------------------------------------------------

    def set_down(self, down: bool) -> None:
        """Every broker unreachable: no fetches, commits or deliveries; errors to error_cb."""
        with self.lock:
            self.down = down
            self._wake()

    def fail_auth(self, failing: bool) -> None:
        """Authentication fails (wrong SASL credentials), reported like librdkafka does."""
        with self.lock:
            self.auth_failing = failing
            self._wake()

    def hold_deliveries(self, hold: bool) -> None:
        """Produced records wait unacknowledged (a slow ISR) while all else works."""
        with self.lock:
            self.holding = hold
            self._wake()

    def set_ack_delay(self, seconds: float) -> None:
        """Each produced record is acknowledged this long after it was produced."""
        with self.lock:
            self.ack_delay_s = seconds
            self._wake()

    def fail_next_deliveries(self, count: int, code: int = KafkaError._MSG_TIMED_OUT) -> None:
        """The next `count` deliveries fail with `code` (in their delivery reports)."""
        with self.lock:
            self._delivery_faults.extend([code] * count)

    def duplicate_next_deliveries(self, count: int) -> None:
        """The next `count` records are written twice unless their producer is idempotent."""
        with self.lock:
            self._duplicates += count

    def evict(self, consumer: MemoryConsumer) -> None:
        """Throw a member out of its group (as a missed session timeout would)."""
        with self.lock:
            consumer._evicted(KafkaError(KafkaError.UNKNOWN_MEMBER_ID, "Broker: Unknown member"))
            self._wake()

    # ---- for the clients (lock held) -----------------------------------------------------

    def _reachable(self) -> bool:
        return not self.down and not self.auth_failing

    def _wake(self) -> None:
        now = time.monotonic()
        for producer in self.producers:
            producer._deliver_locked(now)
        self.changed.notify_all()

    def _partition(self, tp: TP) -> Partition | None:
        parts = self._topics.get(tp[0])
        return parts[tp[1]] if parts is not None and 0 <= tp[1] < len(parts) else None

    def _partition_for(self, topic: str, key: bytes | None, partition: int) -> int | KafkaError:
        if topic not in self._topics:
            if not self.auto_create_topics:
                return KafkaError(KafkaError._UNKNOWN_TOPIC, f"Local: Unknown topic {topic}")
            self.create_topic(topic, self.default_partitions)
        count = len(self._topics[topic])
        if partition >= 0:
            if partition >= count:
                return KafkaError(KafkaError._UNKNOWN_PARTITION, "Local: Unknown partition")
            return partition
        if key is not None:
            return zlib.crc32(key) % count  # librdkafka's consistent partitioner
        turn = self._next_partition.get(topic, 0)
        self._next_partition[topic] = turn + 1
        return turn % count

    def _append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Headers | None,
        txn: Transaction | None,
        control: bool = False,
        timestamp_ms: int | None = None,
    ) -> StoredRecord:
        part = self._topics[topic][partition]
        self._seq += 1
        stamp = timestamp_ms or int(time.time() * 1000)
        record = StoredRecord(part.end(), key, value, headers, stamp, self._seq, txn, control)
        part.records.append(record)
        if txn is not None and not control:
            part.open.setdefault(txn, record.offset)
            txn.first_offsets.setdefault((topic, partition), record.offset)
        self.changed.notify_all()
        return record

    def _delivery_fault(self) -> KafkaError | None:
        if not self._delivery_faults:
            return None
        code = self._delivery_faults.popleft()
        return KafkaError(code, f"injected delivery failure ({KafkaError(code).name()})")

    def _take_duplicate(self) -> bool:
        if self._duplicates:
            self._duplicates -= 1
            return True
        return False

    def _group(self, group_id: str, cooperative: bool) -> Group:
        group = self._groups.get(group_id)
        if group is None:
            group = self._groups[group_id] = Group(group_id, cooperative)
        return group

    def _commit(
        self,
        group_id: str,
        member: Member | None,
        offsets: list[tuple[str, int, int]],
        transactional: bool = False,
    ) -> None:
        group = self._group(group_id, True)
        for topic, partition, offset in offsets:
            if offset < 0:
                continue
            group.committed[(topic, partition)] = offset
            owned = member is not None and (topic, partition) in member.owned
            self.commit_log.append(
                CommitRecord(
                    group_id,
                    member.member_id if member else None,
                    topic,
                    partition,
                    offset,
                    owned,
                    self._seq,
                    transactional,
                )
            )
        self.changed.notify_all()

    def _check_member(self, metadata: object) -> KafkaError | None:
        """send_offsets_to_transaction's group check: a zombie member is refused."""
        if not isinstance(metadata, GroupMetadata):
            return KafkaError(KafkaError._INVALID_ARG, "not this broker's group metadata")
        group = self._groups.get(metadata.group_id)
        if group is None or metadata.member_id not in group.members:
            return KafkaError(
                KafkaError.UNKNOWN_MEMBER_ID,
                "Broker: The coordinator is not aware of this member",
                txn_requires_abort=True,
            )
        return None

    def _register_transactional(self, producer: MemoryProducer, transactional_id: str) -> None:
        """init_transactions: fence the previous producer of this id, abort its transaction."""
        previous = self._transactional.get(transactional_id)
        if previous is not None and previous is not producer:
            previous._fence_locked(
                KafkaError(
                    KafkaError._FENCED,
                    "Producer fenced by newer instance: Failed to acquire transactional PID "
                    "from the transaction coordinator: Broker: Producer attempted to produce "
                    "with an old epoch",
                    fatal=True,
                )
            )
        self._transactional[transactional_id] = producer

    def _end_transaction(self, txn: Transaction, commit: bool) -> None:
        if txn.state != "open":
            return
        txn.state = "committed" if commit else "aborted"
        for topic, partition in sorted(txn.first_offsets):
            self._topics[topic][partition].open.pop(txn, None)
            self._append(topic, partition, None, None, None, txn, control=True)
        if commit:
            for group_id, offsets in txn.offsets.items():
                group = self._groups.get(group_id)
                member = group.members.get(txn.members.get(group_id) or "") if group else None
                self._commit(group_id, member, [(t, p, o) for (t, p), o in offsets.items()], True)
        self.changed.notify_all()

    def _tick(self, now: float) -> None:
        """Members gone silent: past max.poll.interval.ms, or static ones past their session."""
        for group in self._groups.values():
            for member in list(group.members.values()):
                if member.away_since is not None:
                    if now - member.away_since > member.client._session_timeout_s:
                        group.leave(member, self.partitions)
                        self.changed.notify_all()
                elif now - member.client._last_poll > member.client._max_poll_s:
                    member.client._evicted(
                        KafkaError(
                            KafkaError._MAX_POLL_EXCEEDED,
                            "Application maximum poll interval exceeded: leaving group",
                        )
                    )
                    self.changed.notify_all()

    def _next_deadline(self) -> float:
        """When the next _tick may have something to do."""
        deadline = float("inf")
        for group in self._groups.values():
            for member in group.members.values():
                client = member.client
                if member.away_since is not None:
                    deadline = min(deadline, member.away_since + client._session_timeout_s)
                else:
                    deadline = min(deadline, client._last_poll + client._max_poll_s)
        return deadline

    def _statistics(
        self, client: str, assigned: dict[TP, int], group: Group | None
    ) -> dict[str, Any]:
        """A librdkafka-like statistics document (brokers' state, partitions' offsets)."""
        state = "UP" if self._reachable() else ("AUTH_REQ" if self.auth_failing else "DOWN")
        topics: dict[str, Any] = {}
        for (topic, partition), position in sorted(assigned.items()):
            part = self._partition((topic, partition))
            if part is None:
                continue
            committed = group.committed.get((topic, partition), -1001) if group else -1001
            topics.setdefault(topic, {"topic": topic, "partitions": {}})["partitions"][
                str(partition)
            ] = {
                "partition": partition,
                "fetch_state": "active",
                "lo_offset": 0,
                "hi_offset": part.end(),
                "ls_offset": part.stable_end(),
                "committed_offset": committed,
                "next_offset": position,
                "consumer_lag": part.stable_end() - committed if committed >= 0 else -1,
            }
        return {
            "name": client,
            "type": "consumer",
            "ts": int(time.monotonic() * 1_000_000),
            "brokers": {f"{self.address}/0": {"name": f"{self.address}/0", "state": state}},
            "topics": topics,
        }
