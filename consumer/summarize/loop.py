"""The summarizer's loop: results in, window summaries out, exactly once, in transactions.

Consume (read_committed, a consumer group of its own), aggregate (windows.py), and every
`summarize.commit_interval_s` one Kafka transaction with: the summaries of the windows
that closed, the changelog records of the state that changed (state.py) including each
partition's position, and the consumed offsets (`send_offsets_to_transaction`, fenced by
the group's generation, KIP-447). Nothing is produced between commits, so a transaction
lasts milliseconds, and a crash at any instant leaves Kafka as of the last commit: the
next owner of a partition reads its state back and goes on from the position it holds.
Summaries are published once, counts hold every distinct result once.

On assignment each partition's state is read back from the state topic (restore.py) and
the partition is consumed from the position in it. On revoke a partition's uncommitted
work is dropped, for its next owner to redo. A failed transaction stops the summarizer
(exit 1): its memory is ahead of Kafka's, and a restart restores the committed state.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from consumer.config import WorkerSettings
from consumer.stream.client_errors import ClientErrors, Throttle
from consumer.stream.kafka_io import consumer_config, producer_config
from consumer.summarize.health import SummarizerHealth, SummarizerMetrics
from consumer.summarize.restore import StateReader, start_position
from consumer.summarize.results import NotAResultError, read_result
from consumer.summarize.state import POSITION_KEY, changelog_records, encode_position
from consumer.summarize.topics import SummaryTopics, prepare_topics, topic_names
from consumer.summarize.windows import Closed, PartitionWindows, WindowRules

log = structlog.get_logger("consumer.summarize")

# (topic, partition or None, key, value)
Outgoing = tuple[str, int | None, bytes, bytes | None]


class SummarizeError(RuntimeError):
    """The summarizer must stop; what it committed stays, the rest is redone on restart."""


def transactional_id(settings: WorkerSettings) -> str:
    """Stable per pod (kafka.group_instance_id), so a restart fences its previous self."""
    identity = settings.kafka.group_instance_id or f"{socket.gethostname()}-{os.getpid()}"
    return f"{settings.summarize.group_id}-{identity}"


class Summarizer:
    """One summarizer process: `run()` until `request_stop()`; raises SummarizeError."""

    def __init__(
        self,
        settings: WorkerSettings,
        metrics: SummarizerMetrics | None = None,
        health: SummarizerHealth | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 30.0,
    ) -> None:
        self.settings = settings
        self.topics: SummaryTopics = topic_names(settings)
        self.rules = WindowRules.from_settings(settings.summarize)
        self.metrics = metrics or SummarizerMetrics()
        self.health = health or SummarizerHealth(settings.health.loop_stall_s)
        self._clock = clock
        self._timeout_s = timeout_s
        self._windows: dict[int, PartitionWindows] = {}  # by results partition
        self._positions: dict[int, int] = {}  # next results offset, after what was counted
        self._checkpointed: dict[int, int] = {}  # position in the state topic (committed)
        self._eof_at: dict[int, float] = {}  # clock() when a partition was last read to its end
        self._closed: dict[int, list[Closed]] = {}  # closed windows, not yet published
        self._stop = False
        self._failure: str | None = None
        self._broken = False  # a transaction failed: commit nothing more
        self._errors = ClientErrors(settings.kafka.bootstrap_servers, self._fail)
        self._invalid_log = Throttle()
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._reader: Consumer | None = None
        self._state_reader: StateReader | None = None
        self._cooperative = True

    def request_stop(self) -> None:
        self._stop = True

    def _fail(self, why: str) -> None:
        self._failure = self._failure or why

    # ------------------------------------------------------------------------- clients

    def _consumer_config(self, group: str, static: bool) -> dict[str, Any]:
        config = consumer_config(self.settings.kafka, error_cb=self._errors.on_error)
        if not static:
            config.pop("group.instance.id", None)
        config.update({"group.id": group, "enable.partition.eof": True})
        config["isolation.level"] = "read_committed"  # never an aborted summary's input
        return config

    def _producer_config(self) -> dict[str, Any]:
        config = producer_config(self.settings.kafka, error_cb=self._errors.on_error)
        config["transactional.id"] = transactional_id(self.settings)
        # A transaction lasts milliseconds here: one left open by a killed summarizer that
        # no restart fences (another pod name) blocks readers for at most this long.
        config.setdefault("transaction.timeout.ms", 30000)
        return config

    def run(self) -> None:
        s = self.settings.summarize
        prepare_topics(self.settings, self.topics, self._timeout_s)
        self._producer = Producer(self._producer_config())
        try:
            # Fences an earlier incarnation with the same id and aborts its open transaction
            # before anything is restored.
            self._producer.init_transactions(self._timeout_s)
        except KafkaException as exc:
            raise SummarizeError(f"init_transactions failed: {exc.args[0]}") from exc
        config = self._consumer_config(s.group_id, static=True)
        self._cooperative = "cooperative" in str(config.get("partition.assignment.strategy"))
        self._consumer = Consumer(config)
        reader_config = self._consumer_config(f"{s.group_id}.restore", static=False)
        # At the end of a partition the broker holds a fetch for fetch.wait.max.ms (500)
        # before it says so: a restore waits for that end, and only this consumer does.
        reader_config["fetch.wait.max.ms"] = 10
        self._reader = Consumer(reader_config)
        self._state_reader = StateReader(
            self._reader, self.topics.state, self._timeout_s, self._clock, self.health.turned
        )
        log.info(
            "summarizer starting",
            results=self.topics.results,
            summaries=self.topics.summaries,
            state=self.topics.state,
            group_id=s.group_id,
            transactional_id=transactional_id(self.settings),
            window_s=s.window_s,
            grace_s=s.grace_s,
            idle_close_s=s.idle_close_s,
        )
        clean = False
        try:
            self._consumer.subscribe(
                [self.topics.results],
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
            self.health.subscribed = True
            self._loop()
            self._commit()  # what the last interval counted and closed
            clean = True
        except KafkaException as exc:  # e.g. from a rebalance callback, or a fatal error
            raise SummarizeError(f"Kafka client error: {exc.args[0]}") from exc
        finally:
            self._broken = self._broken or not clean  # close() must not commit after a failure
            self._consumer.close()
            self._reader.close()
            if clean:
                self._producer.flush(self._timeout_s)
        log.info("summarizer stopped", open_windows=self._open_windows())

    def _loop(self) -> None:
        assert self._consumer is not None
        interval = self.settings.summarize.commit_interval_s
        next_commit = self._clock() + interval
        while not self._stop:
            for message in self._consumer.consume(500, timeout=self.settings.kafka.poll_timeout_s):
                self._handle(message)
            self.health.turned()
            if self._failure is not None:
                raise SummarizeError(self._failure)
            if self._clock() >= next_commit:
                self._close_idle()
                self._commit()
                next_commit = self._clock() + interval

    # ------------------------------------------------------------------- the records

    def _handle(self, message: Message) -> None:
        partition = int(message.partition() or 0)
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                self._eof_at[partition] = self._clock()
            else:
                self._errors.on_consume_error(error)
            return
        windows = self._windows.get(partition)
        if windows is None:  # fetched before its partition was revoked
            return
        offset = int(message.offset() or 0)
        try:
            facts = read_result(message.value())
        except NotAResultError as exc:
            self.metrics.results.labels("invalid").inc()
            held = self._invalid_log.admit("invalid")
            if held is not None:
                log.warning(
                    "not a result, skipped",
                    partition=partition,
                    offset=offset,
                    error=str(exc),
                    suppressed=held,
                )
        else:
            outcome, closed = windows.add(facts)
            self.metrics.results.labels(outcome).inc()
            if closed:
                self._closed.setdefault(partition, []).extend(closed)
        self._positions[partition] = offset + 1

    def _close_idle(self) -> None:
        """Close the windows of streams silent for summarize.idle_close_s, where the silence
        is real: their partition has been read to its end since their latest result."""
        now = self._clock()
        for partition, windows in self._windows.items():
            eof = self._eof_at.get(partition)
            if eof is not None:
                closed = windows.close_idle(min(now - self.settings.summarize.idle_close_s, eof))
                if closed:
                    self._closed.setdefault(partition, []).extend(closed)

    def _open_windows(self) -> int:
        return sum(w.open_windows() for w in self._windows.values())

    # ------------------------------------------------------------------ transactions

    def _outgoing(self) -> list[Outgoing]:
        closed_at = datetime.now(UTC)
        out: list[Outgoing] = []
        for closed in (c for p in sorted(self._closed) for c in self._closed[p]):
            summary = closed.window.summary(closed.stream_id, closed_at)
            out.append(
                (
                    self.topics.summaries,
                    None,
                    closed.stream_id.encode(),
                    summary.model_dump_json().encode(),
                )
            )
        for partition, windows in sorted(self._windows.items()):
            records = changelog_records(windows.take_changes())
            position = self._positions.get(partition)
            if position is not None and position != self._checkpointed.get(partition):
                records.append((POSITION_KEY, encode_position(position)))
            out += [(self.topics.state, partition, key, value) for key, value in records]
        return out

    def _commit(self) -> None:
        """One transaction: closed windows' summaries, changed state, consumed offsets."""
        if self._broken or self._producer is None or self._consumer is None:
            return
        outgoing = self._outgoing()
        self.metrics.open_windows.set(self._open_windows())
        if not outgoing:
            return  # nothing counted, closed or consumed since the last transaction
        producer = self._producer
        offsets = [
            TopicPartition(self.topics.results, p, o) for p, o in sorted(self._positions.items())
        ]
        try:
            producer.begin_transaction()
            for topic, partition, key, value in outgoing:
                self._produce(topic, partition, key, value)
            metadata = self._consumer.consumer_group_metadata()
            self._retrying(
                lambda: producer.send_offsets_to_transaction(offsets, metadata, self._timeout_s)
            )
            self._commit_transaction()
        except KafkaException as exc:
            self._broken = True
            self.metrics.transactions.labels("failed").inc()
            # Fenced or fatal, the abort fails too: the broker aborts it, or the next
            # incarnation does.
            with contextlib.suppress(KafkaException):
                producer.abort_transaction(self._timeout_s)
            raise SummarizeError(
                f"transaction failed ({exc.args[0]}); restarting restores the committed state"
            ) from exc
        self.metrics.transactions.labels("ok").inc()
        for closed in (c for cs in self._closed.values() for c in cs):
            self.metrics.windows_closed.labels(closed.reason).inc()
        self._closed.clear()
        self._checkpointed.update(self._positions)

    def _produce(self, topic: str, partition: int | None, key: bytes, value: bytes | None) -> None:
        assert self._producer is not None
        kwargs: dict[str, Any] = {} if partition is None else {"partition": partition}
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, **kwargs)
                return
            except BufferError:  # the local queue is full: let deliveries drain it
                self._producer.poll(0.1)

    def _commit_transaction(self) -> None:
        producer = self._producer
        assert producer is not None
        self._retrying(lambda: producer.commit_transaction(self._timeout_s))

    def _retrying(self, call: Callable[[], object]) -> None:
        """A transactional call, made again while Kafka says its outcome is unknown
        (a retriable error: a timeout, a coordinator moving), up to the timeout."""
        deadline = self._clock() + self._timeout_s
        while True:
            try:
                call()
                return
            except KafkaException as exc:
                error = exc.args[0]
                if not (error.retriable() and self._clock() < deadline):
                    raise
                log.warning("transaction call to retry", error=str(error))

    # ------------------------------------------------------------------- rebalances

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        mine = [tp.partition for tp in partitions if tp.topic == self.topics.results]
        if self._broken or not mine:
            return
        self.health.restoring = True
        try:
            asked = [TopicPartition(self.topics.results, p) for p in mine]
            # Blocks while a transaction that commits offsets of these partitions is still
            # open (KIP-447, require_stable): one left by a killed pod of another name is
            # aborted after transaction.timeout.ms (30 s), so wait longer than that.
            stable = consumer.committed(asked, 2 * self._timeout_s)
            committed = {tp.partition: tp.offset for tp in stable}
            starts = [
                TopicPartition(self.topics.results, p, self._restore(p, committed[p])) for p in mine
            ]
        finally:
            self.health.restoring = False
        if self._cooperative:
            consumer.incremental_assign(starts)
        else:
            consumer.assign(starts)
        log.info("partitions assigned", partitions=mine, open_windows=self._open_windows())

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # What these partitions counted since the last transaction is dropped, not
        # committed: nothing of it has been produced yet, and the next owner redoes it
        # from the committed state (at most commit_interval_s of work). Committing here
        # instead could fail mid-rebalance, and an abort would take the other
        # partitions' uncommitted work with it.
        self._drop([tp.partition for tp in partitions])
        log.info("partitions revoked", partitions=[tp.partition for tp in partitions])

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drop([tp.partition for tp in partitions])  # another member may own them now
        log.warning("partitions lost", partitions=[tp.partition for tp in partitions])

    def _drop(self, partitions: list[int]) -> None:
        for p in partitions:
            for held in (
                self._windows,
                self._positions,
                self._checkpointed,
                self._eof_at,
                self._closed,
            ):
                held.pop(p, None)

    def _restore(self, partition: int, committed: int) -> int:
        """Read partition's state back; the results offset to go on from."""
        assert self._state_reader is not None
        started = self._clock()
        windows = PartitionWindows(self.rules, self._clock)
        restorer = self._state_reader.read(partition, windows, committed)
        windows.touch_all()  # idleness is counted from now
        resized = windows.close_resized()  # summarize.window_s was changed: publish them now
        if resized:
            self._closed.setdefault(partition, []).extend(resized)
        self._windows[partition] = windows
        self._eof_at.pop(partition, None)
        self.metrics.restored_records.inc(restorer.records)
        position = start_position(partition, restorer.position, committed)
        if position >= 0:
            self._positions[partition] = position
            if restorer.position is not None:  # else a position record goes out next time
                self._checkpointed[partition] = position
        log.info(
            "state restored",
            partition=partition,
            records=restorer.records,
            open_windows=windows.open_windows(),
            position=position,
            took_s=round(self._clock() - started, 3),
        )
        return position
