"""The in-memory broker's producer: confluent_kafka.Producer's surface, transactions included.

A record is acknowledged (appended to the log) as soon as the broker accepts it, and its
delivery report is served by the next poll()/flush(). While the broker is down or holds
deliveries they wait, and fail with _MSG_TIMED_OUT after message.timeout.ms.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from consumer.stream.memory_clients import Call, ClientBase, deadline_after, flag, wait_s
from consumer.stream.memory_log import GroupMetadata, Headers, Transaction

if TYPE_CHECKING:
    from consumer.stream.memory_broker import MemoryBroker


@dataclass(eq=False)
class _Pending:
    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: Headers | None
    on_delivery: Callable[[KafkaError | None, Message], None] | None
    produced_at: float
    txn: Transaction | None
    timestamp_ms: int | None = None


def _bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _headers(headers: Any) -> Headers | None:
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, dict) else headers
    return [(str(k), _bytes(v)) for k, v in pairs]


class MemoryProducer(ClientBase):
    """confluent_kafka.Producer's produce/poll/flush and transactions on a MemoryBroker."""

    kind = "Producer"

    def __init__(self, broker: MemoryBroker, config: dict[str, Any]) -> None:
        super().__init__(broker, config)
        self.transactional_id: str | None = config.get("transactional.id")
        self.idempotent = flag(config.get("enable.idempotence"), False) or bool(
            self.transactional_id
        )
        timeout_ms = config.get("message.timeout.ms", config.get("delivery.timeout.ms", 300_000))
        self._message_timeout_s = int(timeout_ms) / 1000
        self._queue_max = int(config.get("queue.buffering.max.messages", 100_000))
        self._pending: deque[_Pending] = deque()
        self._reports: deque[Call] = deque()
        self._txn: Transaction | None = None
        self._txn_ready = False
        self._fatal: KafkaError | None = None

    def __len__(self) -> int:
        with self._broker.lock:
            return len(self._pending) + len(self._reports)

    def produce(
        self,
        topic: str,
        value: str | bytes | None = None,
        key: str | bytes | None = None,
        partition: int = -1,
        on_delivery: Callable[[KafkaError | None, Message], None] | None = None,
        timestamp: int = 0,
        headers: Any = None,
        *,
        callback: Callable[[KafkaError | None, Message], None] | None = None,
    ) -> None:
        self._check_open()
        if self._fatal is not None:
            raise KafkaException(
                KafkaError(KafkaError._FATAL, f"Fatal error: {self._fatal.str()}", fatal=True)
            )
        if self.transactional_id and self._txn is None:
            raise KafkaException(KafkaError(KafkaError._STATE, "Producer is not in a transaction"))
        broker = self._broker
        with broker.lock:
            if len(self._pending) >= self._queue_max:
                raise BufferError("Local: Queue full")
            chosen = broker._partition_for(topic, _bytes(key), partition)
            item = _Pending(
                topic,
                -1 if isinstance(chosen, KafkaError) else chosen,
                _bytes(key),
                _bytes(value),
                _headers(headers),
                on_delivery or callback,
                time.monotonic(),
                self._txn,
                timestamp or None,
            )
            if isinstance(chosen, KafkaError):
                self._report_locked(item, chosen)
            else:
                self._pending.append(item)
                self._deliver_locked(item.produced_at)

    def _deliver_locked(self, now: float) -> None:
        """Acknowledge what the broker accepts now, in order (lock held)."""
        broker = self._broker
        while self._pending and not self._closed:
            item = self._pending[0]
            if not broker._reachable() or broker.holding:
                return
            if now < item.produced_at + broker.ack_delay_s:
                return
            self._pending.popleft()
            error = broker._delivery_fault()
            if error is not None:
                self._report_locked(item, error)
                continue
            txn = item.txn if item.txn is not None and item.txn.state == "open" else None
            args = (item.topic, item.partition, item.key, item.value, item.headers, txn)
            record = broker._append(*args, timestamp_ms=item.timestamp_ms)
            if broker._take_duplicate() and not self.idempotent:
                # a retried send the broker cannot recognise
                broker._append(*args, timestamp_ms=item.timestamp_ms)
            self._report_locked(item, None, record.offset)

    def _report_locked(self, item: _Pending, error: KafkaError | None, offset: int = -1001) -> None:
        if error is not None and item.txn is not None and item.txn.error is None:
            item.txn.error = error
        if item.on_delivery is None:
            return
        message = Message(
            topic=item.topic,
            partition=item.partition,
            offset=offset,
            key=item.key,
            value=item.value,
            headers=list(item.headers) if item.headers else None,
            error=error,
        )
        self._reports.append(partial(item.on_delivery, error, message))
        self._broker.changed.notify_all()

    def _calls_locked(self, now: float) -> list[Call]:
        self._deliver_locked(now)
        while self._pending and now >= self._pending[0].produced_at + self._message_timeout_s:
            timed_out = KafkaError(KafkaError._MSG_TIMED_OUT, "Local: Message timed out")
            self._report_locked(self._pending.popleft(), timed_out)
        calls = self._common_calls_locked(now)
        calls += self._reports
        self._reports.clear()
        return calls

    def _timer_locked(self) -> float:
        timer = self._common_timer_locked()
        if self._pending:
            head = self._pending[0].produced_at
            timer = min(timer, head + self._message_timeout_s)
            if self._broker._reachable() and not self._broker.holding:
                timer = min(timer, head + self._broker.ack_delay_s)
        return timer

    def poll(self, timeout: float | None = None) -> int:
        self._check_open()
        deadline = deadline_after(timeout)
        broker = self._broker
        while True:
            with broker.lock:
                now = time.monotonic()
                calls = self._calls_locked(now)
                if not calls:
                    if deadline is not None and now >= deadline:
                        return 0
                    broker.changed.wait(wait_s(now, deadline, self._timer_locked()))
                    continue
            for call in calls:
                call()
            return len(calls)

    def flush(self, timeout: float | None = None) -> int:
        """Serve reports until nothing is pending; returns how many still are."""
        self._check_open()
        deadline = deadline_after(timeout)
        broker = self._broker
        while True:
            with broker.lock:
                now = time.monotonic()
                calls = self._calls_locked(now)
                if not calls:
                    if not self._pending or (deadline is not None and now >= deadline):
                        return len(self._pending)
                    broker.changed.wait(wait_s(now, deadline, self._timer_locked()))
                    continue
            for call in calls:
                call()

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        with self._broker.lock:
            self._purge_locked()

    def _purge_locked(self) -> None:
        while self._pending:
            purged = KafkaError(KafkaError._PURGE_QUEUE, "Local: Purged in queue")
            self._report_locked(self._pending.popleft(), purged)

    def close(self) -> bool:
        """Like confluent-kafka: abort an open transaction, flush, shut down."""
        if self._closed:
            return True
        if self._txn is not None and self._fatal is None:
            self.abort_transaction()
        self.flush(self._message_timeout_s)
        with self._broker.lock:
            self._closed = True
            self._broker.changed.notify_all()
        return True

    def _fence_locked(self, error: KafkaError) -> None:
        """A newer producer took our transactional.id: fatal, like librdkafka's _FENCED."""
        self._fatal = error
        self._errors.append(error)
        if self._txn is not None:
            self._broker._end_transaction(self._txn, commit=False)
        while self._pending:
            self._report_locked(self._pending.popleft(), error)

    # ---- transactions --------------------------------------------------------------------

    def _txn_check(self, in_transaction: bool | None) -> None:
        self._check_open()
        if self._fatal is not None:
            raise KafkaException(self._fatal)
        if not self.transactional_id:
            raise KafkaException(
                KafkaError(KafkaError._NOT_CONFIGURED, "transactional.id is not configured")
            )
        if in_transaction is not None and (self._txn is not None) != in_transaction:
            state = "in a transaction" if self._txn is not None else "not in a transaction"
            raise KafkaException(KafkaError(KafkaError._STATE, f"Operation not valid: {state}"))

    def _await_broker(self, timeout: float | None) -> None:
        deadline = deadline_after(timeout)
        with self._broker.lock:
            while not self._broker._reachable():
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise KafkaException(
                        KafkaError(
                            KafkaError._TIMED_OUT,
                            "Transactional operation timed out: coordinator not reachable",
                            retriable=True,
                        )
                    )
                self._broker.changed.wait(wait_s(now, deadline, float("inf")))

    def init_transactions(self, timeout: float | None = None) -> None:
        self._txn_check(None)
        self._await_broker(timeout)
        with self._broker.lock:
            assert self.transactional_id is not None
            if self._txn is not None:
                self._broker._end_transaction(self._txn, commit=False)
                self._txn = None
            self._broker._register_transactional(self, self.transactional_id)
            self._txn_ready = True

    def begin_transaction(self) -> None:
        self._txn_check(False)
        if not self._txn_ready:
            raise KafkaException(KafkaError(KafkaError._STATE, "init_transactions() not called"))
        with self._broker.lock:
            assert self.transactional_id is not None
            self._txn = Transaction(self.transactional_id)

    def send_offsets_to_transaction(
        self, positions: list[TopicPartition], group_metadata: object, timeout: float | None = None
    ) -> None:
        self._txn_check(True)
        self._await_broker(timeout)
        with self._broker.lock:
            error = self._broker._check_member(group_metadata)
            if error is not None:
                raise KafkaException(error)
            assert isinstance(group_metadata, GroupMetadata) and self._txn is not None
            group = group_metadata.group_id
            self._txn.members[group] = group_metadata.member_id
            offsets = self._txn.offsets.setdefault(group, {})
            offsets.update({(tp.topic, tp.partition): tp.offset for tp in positions})

    def commit_transaction(self, timeout: float | None = None) -> None:
        self._txn_check(True)
        if self.flush(timeout):
            raise KafkaException(
                KafkaError(
                    KafkaError._TIMED_OUT, "Failed to flush outstanding messages", retriable=True
                )
            )
        self._await_broker(timeout)
        with self._broker.lock:
            self._txn_check(True)  # fenced meanwhile?
            assert self._txn is not None
            failed = self._txn.error
            if failed is not None:
                raise KafkaException(
                    KafkaError(
                        failed.code(),
                        f"Failed to commit transaction: a message failed delivery: {failed.str()}",
                        txn_requires_abort=True,
                    )
                )
            self._broker._end_transaction(self._txn, commit=True)
            self._txn = None

    def abort_transaction(self, timeout: float | None = None) -> None:
        self._txn_check(True)
        with self._broker.lock:
            assert self._txn is not None
            self._purge_locked()
            self._broker._end_transaction(self._txn, commit=False)
            self._txn = None
