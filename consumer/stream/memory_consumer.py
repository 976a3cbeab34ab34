"""The in-memory broker's consumer: confluent_kafka.Consumer's surface as the worker uses it.

Subscribing joins the broker's consumer group on the next consume(); rebalance callbacks
(on_assign, on_revoke, on_lost), error_cb, stats_cb and on_commit run from consume() on
the caller's thread. on_commit reports asynchronous and automatic commits only: a
synchronous commit returns (or raises) its result, and confluent-kafka-python 2.16 queues
no report for it (measured against the real broker).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from consumer.stream.memory_clients import Call, ClientBase, deadline_after, flag, wait_s
from consumer.stream.memory_groups import TP, Group, Member
from consumer.stream.memory_log import GroupMetadata

if TYPE_CHECKING:
    from consumer.stream.memory_broker import MemoryBroker

OFFSET_INVALID = -1001


class MemoryConsumer(ClientBase):
    """confluent_kafka.Consumer's subscribe/consume/commit surface on a MemoryBroker."""

    kind = "Consumer"

    def __init__(self, broker: MemoryBroker, config: dict[str, Any]) -> None:
        super().__init__(broker, config)
        self.group_id: str | None = config.get("group.id")
        strategy = str(config.get("partition.assignment.strategy", "range,roundrobin"))
        self._cooperative = "cooperative-sticky" in strategy
        self._read_committed = config.get("isolation.level", "read_committed") == "read_committed"
        reset = str(config.get("auto.offset.reset", "latest"))
        self._earliest = reset in ("earliest", "smallest", "beginning")
        self._instance_id: str | None = config.get("group.instance.id")
        self._max_poll_s = int(config.get("max.poll.interval.ms", 300_000)) / 1000
        self._session_timeout_s = int(config.get("session.timeout.ms", 45_000)) / 1000
        self._auto_commit = flag(config.get("enable.auto.commit"), True)
        self._auto_store = flag(config.get("enable.auto.offset.store"), True)
        self._auto_commit_every_s = int(config.get("auto.commit.interval.ms", 5000)) / 1000
        self._next_auto_commit = time.monotonic() + self._auto_commit_every_s
        self._on_commit: Callable[[KafkaError | None, list[TopicPartition]], None] | None = (
            config.get("on_commit")
        )
        self._topics: tuple[str, ...] = ()
        self._callbacks: dict[str, Callable[[Any, list[TopicPartition]], None] | None] = {}
        self._group: Group | None = None
        self._member: Member | None = None
        self._assigned: dict[TP, int] = {}  # partition -> position (next offset to read)
        self._paused: set[TP] = set()  # kept after unassignment, like librdkafka
        self._stored: dict[TP, int] = {}
        self._commit_reports: deque[tuple[KafkaError | None, list[TopicPartition]]] = deque()
        self._lost = False
        self._last_poll = time.monotonic()
        self._turn = 0

    # ---- group membership -----------------------------------------------------------------

    def subscribe(
        self,
        topics: list[str],
        on_assign: Callable[[Any, list[TopicPartition]], None] | None = None,
        on_revoke: Callable[[Any, list[TopicPartition]], None] | None = None,
        on_lost: Callable[[Any, list[TopicPartition]], None] | None = None,
    ) -> None:
        self._check_open()
        if not self.group_id:
            raise KafkaException(KafkaError(KafkaError._INVALID_ARG, "group.id is not set"))
        self._callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
        with self._broker.lock:
            self._topics = tuple(topics)
            if self._member is not None and self._group is not None:
                self._member.topics = self._topics
                self._group.rebalance(self._broker.partitions)
            self._broker.changed.notify_all()

    def unsubscribe(self) -> None:
        self._check_open()
        self._leave()
        with self._broker.lock:
            self._topics = ()

    def _join_locked(self) -> None:
        broker = self._broker
        if self._member is not None or not self._topics or not broker._reachable():
            return
        assert self.group_id is not None
        self._group = broker._group(self.group_id, self._cooperative)
        self._member, fenced = self._group.join(
            self, self._topics, self._instance_id, broker.partitions
        )
        if fenced is not None:
            fenced.client._evicted(
                KafkaError(
                    KafkaError.FENCED_INSTANCE_ID,
                    "Broker: Static consumer fenced by other consumer with same group.instance.id",
                    fatal=True,
                ),
                rejoin=False,
            )
        broker.changed.notify_all()

    def _evicted(self, error: KafkaError, rejoin: bool = True) -> None:
        """Out of the group (lock held): the partitions are lost; rejoin on the next poll."""
        if self._member is not None and self._group is not None:
            self._group.leave(self._member, self._broker.partitions)
        self._member = None
        self._lost = True
        self._errors.append(error)
        if not rejoin:
            self._topics = ()

    def _rebalance_step_locked(self) -> tuple[str, list[TP]] | None:
        if self._lost:
            self._lost = False
            return "lost", sorted(self._assigned)
        self._join_locked()
        if self._member is None or self._group is None or not self._broker._reachable():
            return None
        return self._group.next_step(self._member)

    def _rebalance(self, kind: str, partitions: list[TP]) -> None:
        """Run one rebalance callback (no lock held), then apply it as librdkafka would."""
        listed = [TopicPartition(t, p) for t, p in partitions]
        callback = self._callbacks.get(kind)
        if kind == "lost" and callback is None:
            callback = self._callbacks.get("revoke")
        if callback is not None and (listed or kind == "assign"):
            callback(self, listed)
        broker = self._broker
        with broker.lock:
            if kind == "assign":
                for tp, given in zip(partitions, listed, strict=True):
                    self._assigned[tp] = given.offset if given.offset >= 0 else self._start(tp)
            else:
                for tp in partitions:
                    self._assigned.pop(tp, None)
                    self._stored.pop(tp, None)
                if kind == "revoke" and self._member is not None:
                    Group.revoked(self._member, partitions)
            broker.changed.notify_all()

    def _start(self, tp: TP) -> int:
        committed = self._group.committed.get(tp) if self._group else None
        if committed is not None:
            return committed
        part = self._broker._partition(tp)
        return 0 if self._earliest or part is None else part.end()

    def _leave(self) -> None:
        """Revoke what is assigned (callback on this thread), then leave the group."""
        with self._broker.lock:
            owned = sorted(self._assigned) if self._member is not None else []
        if owned:
            self._rebalance("revoke", owned)
        with self._broker.lock:
            member, group = self._member, self._group
            if member is not None and group is not None:
                if self._instance_id:
                    # Static membership: no LeaveGroup; the slot waits session.timeout.ms.
                    member.away_since = time.monotonic()
                    member.owned.clear()
                else:
                    group.leave(member, self._broker.partitions)
            self._member = None
            self._assigned.clear()
            self._broker.changed.notify_all()

    # ---- consuming -----------------------------------------------------------------------

    def consume(self, num_messages: int = 1, timeout: float | None = -1) -> list[Message]:
        self._check_open()
        if not 1 <= num_messages <= 1_000_000:
            raise ValueError("num_messages must be between 1 and 1000000")
        deadline = deadline_after(timeout)
        broker = self._broker
        while True:
            step = None
            with broker.lock:
                now = time.monotonic()
                broker._tick(now)  # a poll that comes too late finds itself evicted
                self._last_poll = now
                calls = self._calls_locked(now)
                if not calls:
                    step = self._rebalance_step_locked()
                if not calls and step is None:
                    messages = self._fetch_locked(num_messages)
                    if messages or (deadline is not None and now >= deadline):
                        return messages
                    timer = min(self._timer_locked(), broker._next_deadline())
                    broker.changed.wait(wait_s(now, deadline, timer))
                    continue
            for call in calls:
                call()
            if step is not None:
                self._rebalance(*step)

    def poll(self, timeout: float | None = None) -> Message | None:
        messages = self.consume(1, -1 if timeout is None else timeout)
        return messages[0] if messages else None

    def _calls_locked(self, now: float) -> list[Call]:
        calls = self._common_calls_locked(now)
        if self._auto_commit and self._stored and now >= self._next_auto_commit:
            self._next_auto_commit = now + self._auto_commit_every_s
            self._commit_locked([(t, p, o) for (t, p), o in self._stored.items()])
        on_commit = self._on_commit
        while self._commit_reports:
            error, partitions = self._commit_reports.popleft()
            if on_commit is not None:
                calls.append(partial(on_commit, error, partitions))
        return calls

    def _timer_locked(self) -> float:
        timer = self._common_timer_locked()
        if self._auto_commit and self._stored:
            timer = min(timer, self._next_auto_commit)
        return timer

    def _fetch_locked(self, limit: int) -> list[Message]:
        broker = self._broker
        active = [tp for tp in self._assigned if tp not in self._paused]
        if not active or not broker._reachable():
            return []
        self._turn += 1
        start = self._turn % len(active)
        order = active[start:] + active[:start]
        share = max(1, limit // len(order))  # interleave the partitions, in order within each
        out: list[Message] = []
        more = True
        while more and len(out) < limit:
            more = False
            for tp in order:
                part = broker._partition(tp)
                if part is None:
                    continue
                end = part.stable_end() if self._read_committed else part.end()
                position, taken = self._assigned[tp], 0
                while position < end and taken < share and len(out) < limit:
                    record = part.records[position]
                    position += 1
                    if record.visible(self._read_committed):
                        out.append(record.message(*tp))
                        taken += 1
                if self._auto_store and position > self._assigned[tp]:
                    self._stored[tp] = position
                self._assigned[tp] = position
                more = more or position < end
        return out

    def assignment(self) -> list[TopicPartition]:
        self._check_open()
        with self._broker.lock:
            return [TopicPartition(t, p) for t, p in sorted(self._assigned)]

    def pause(self, partitions: list[TopicPartition]) -> None:
        self._check_open()
        with self._broker.lock:
            self._paused.update((tp.topic, tp.partition) for tp in partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self._check_open()
        with self._broker.lock:
            self._paused.difference_update((tp.topic, tp.partition) for tp in partitions)
            self._broker.changed.notify_all()

    def paused(self) -> list[TP]:
        """Not in confluent-kafka: the partitions paused now (assigned or not)."""
        with self._broker.lock:
            return sorted(self._paused)

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        with self._broker.lock:
            return [
                TopicPartition(tp.topic, tp.partition, self._assigned.get(key, OFFSET_INVALID))
                for tp in partitions
                for key in [(tp.topic, tp.partition)]
            ]

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float | None = None, cached: bool = False
    ) -> tuple[int, int]:
        part = self._broker._partition((partition.topic, partition.partition))
        return (0, part.end() if part else 0)

    # ---- committing ----------------------------------------------------------------------

    def commit(
        self,
        message: Message | None = None,
        offsets: list[TopicPartition] | None = None,
        asynchronous: bool = True,
    ) -> list[TopicPartition] | None:
        self._check_open()
        with self._broker.lock:
            if message is not None:
                wanted = [(str(message.topic()), int(message.partition() or 0), _next(message))]
            elif offsets is not None:
                wanted = [(tp.topic, tp.partition, tp.offset) for tp in offsets]
            else:
                wanted = [(t, p, o) for (t, p), o in sorted(self._stored.items())]
            if not wanted:
                raise KafkaException(KafkaError(KafkaError._NO_OFFSET, "Local: No offset stored"))
            error, result = self._commit_locked(wanted, report=asynchronous)
        if error is not None and not asynchronous:
            raise KafkaException(error)
        return None if asynchronous else result

    def _commit_locked(
        self, wanted: list[tuple[str, int, int]], report: bool = True
    ) -> tuple[KafkaError | None, list[TopicPartition]]:
        """Commit (lock held); `report`: queue an on_commit report (not for sync commits)."""
        broker = self._broker
        error = None
        if not broker._reachable():
            error = KafkaError(
                KafkaError._TRANSPORT, "Local: Broker transport failure", retriable=True
            )
        elif self._member is None and self._topics:
            error = KafkaError(KafkaError.UNKNOWN_MEMBER_ID, "Broker: Unknown member")
        else:
            assert self.group_id is not None
            broker._commit(self.group_id, self._member, wanted)
        result = [TopicPartition(t, p, o) for t, p, o in wanted]
        if report:
            self._commit_reports.append((error, result))
        broker.changed.notify_all()
        return error, result

    def committed(
        self, partitions: list[TopicPartition], timeout: float | None = None
    ) -> list[TopicPartition]:
        self._check_open()
        with self._broker.lock:
            if not self._broker._reachable():
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "Local: Timed out"))
            group = self._broker._groups.get(self.group_id or "")
            offsets = group.committed if group else {}
            return [
                TopicPartition(tp.topic, tp.partition, offsets.get(key, OFFSET_INVALID))
                for tp in partitions
                for key in [(tp.topic, tp.partition)]
            ]

    def memberid(self) -> str | None:
        self._check_open()
        with self._broker.lock:
            return self._member.member_id if self._member else None

    def consumer_group_metadata(self) -> GroupMetadata:
        self._check_open()
        with self._broker.lock:
            generation = self._group.generation if self._group else -1
            member = self._member.member_id if self._member else None
            return GroupMetadata(self.group_id or "", generation, member)

    def close(self) -> None:
        if self._closed:
            return
        self._leave()
        with self._broker.lock:
            if self._auto_commit and self._stored and self._broker._reachable():
                assert self.group_id is not None
                self._broker._commit(self.group_id, None, list(_flat(self._stored)))
            self._closed = True
            self._broker.changed.notify_all()

    def _statistics_locked(self) -> dict[str, Any]:
        return self._broker._statistics(self.kind, self._assigned, self._group)


def _next(message: Message) -> int:
    offset = message.offset()
    return OFFSET_INVALID if offset is None else offset + 1


def _flat(offsets: dict[TP, int]) -> list[tuple[str, int, int]]:
    return [(t, p, o) for (t, p), o in sorted(offsets.items())]
