"""One worker process: the poll loop. poll -> validate -> fetch (threads) -> batch -> engine
-> publish -> commit.

The Worker polls, hands each record on, follows assignment and revocation, and stops; the
other steps are units of their own:

- fetch threads (a pool) download, decode and crop: `stages.prepare_event`;
- the engine thread runs micro-batches through the model (`EngineThread`, `BatchRunner`)
  and hands their outcomes, in input order, to the `Publisher`;
- the Publisher produces them and turns delivery reports into done offsets;
- `CommitPolicy` decides when to commit what (with a `Committer`: offsets or transaction);
- `Backpressure` pauses and resumes the assignment;
- `ClientErrors` sorts the Kafka clients' errors (fatal, auth, unreachable, retriable).

Invariant: an input offset is committed only after the result or dead letter of that event
and of every earlier event of its partition was acknowledged by the broker (OffsetTracker);
in exactly_once mode, in the same transaction as those results.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from consumer.config import WorkerSettings
from consumer.decode.pool import Decoder, make_decoder
from consumer.errors import EventError
from consumer.fetch.pool import close_idle_connections
from consumer.ops.metrics import HealthState, WorkerMetrics, gpu_memory_bytes, lag_from_statistics
from consumer.stream.backpressure import Backpressure
from consumer.stream.batch_runner import BatchRunner, Classifier
from consumer.stream.batching import MicroBatcher
from consumer.stream.client_errors import ClientErrors
from consumer.stream.commit_policy import CommitPolicy
from consumer.stream.committer import CommitError, OffsetCommitter, TransactionCommitter
from consumer.stream.engine_thread import EngineThread
from consumer.stream.failure import Failure
from consumer.stream.kafka_io import consumer_config, producer_config, to_record
from consumer.stream.offsets import OffsetTracker
from consumer.stream.publisher import Publisher
from consumer.stream.records import FailedEvent, InputRecord, Item, PreparedEvent
from consumer.stream.stages import parse_event, prepare_event

log = structlog.get_logger("consumer.stream.worker")

CLOSE_TIMEOUT_S = 10.0
# Events taken per consume call at most (fewer when backpressure leaves less room).
MAX_CONSUME = 500

__all__ = ["Classifier", "Worker"]


def _resolved(item: Item) -> Future[Item]:
    future: Future[Item] = Future()
    future.set_result(item)
    return future


class Worker:
    """Runs until `request_stop()`; `run()` returns the process exit code."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: Classifier,
        *,
        consumer_factory: Callable[[dict[str, Any]], Consumer] = Consumer,
        producer_factory: Callable[[dict[str, Any]], Producer] = Producer,
        decoder: Decoder | None = None,
        metrics: WorkerMetrics | None = None,
        health: HealthState | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics or WorkerMetrics()
        self.health = health or HealthState(
            settings.health.loop_stall_s, settings.health.stall_timeout_s
        )
        self._failure = Failure()
        self.tracker = OffsetTracker()
        kafka = settings.kafka
        self._client = ClientErrors(kafka.bootstrap_servers, self._failure.fail)
        self._consumer = consumer_factory(
            consumer_config(
                kafka,
                error_cb=self._client.on_error,
                on_commit=lambda error, partitions: self._commits.on_commit(error, partitions),
                stats_cb=self._on_statistics,
                statistics_interval_s=settings.health.statistics_interval_s,
            )
        )
        producer = producer_factory(producer_config(kafka, error_cb=self._client.on_error))
        self._producer = producer
        self.publisher = Publisher(
            producer,
            self.tracker,
            self.metrics,
            self.health,
            self._failure,
            on_delivered=self._client.reached,
        )
        committer = (
            TransactionCommitter(self._consumer, producer)
            if kafka.processing_guarantee == "exactly_once"
            else OffsetCommitter(self._consumer)
        )
        self._commits = CommitPolicy(
            kafka, self.tracker, committer, self.publisher, self.metrics, self._failure
        )
        self._backpressure = Backpressure(settings.flow)
        self.batcher = MicroBatcher(
            settings.batch.max_batch_size, settings.batch.max_wait_ms / 1000.0
        )
        self._engine = EngineThread(
            self.batcher,
            BatchRunner(
                engine,
                kafka.output_topic,
                kafka.dead_letter_topic,
                settings.dead_letter.include_payload,
            ),
            self.publisher,
            self.metrics,
            self._failure,
            settings.batch.max_batch_size,
        )
        self._pool = ThreadPoolExecutor(settings.fetch.threads, thread_name_prefix="fetch")
        # Started here, before joining the group: a worker that cannot decode must fail
        # at start, not after taking partitions.
        self._decoder = decoder or make_decoder(
            settings.decode,
            settings.faces,
            settings.fetch.max_pixels,
            settings.fetch.max_bytes,
            on_failure=lambda cause: self.metrics.decoder_failures.labels(cause=cause).inc(),
        )
        self._stop = threading.Event()
        self._closing = False
        self.closed_cleanly = True
        self._gauges_at = 0.0

    # ---- control -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop taking new events; run() drains what is in flight and returns."""
        self.health.stopping = True
        self._stop.set()

    @property
    def failure(self) -> str | None:
        return self._failure.reason

    def run(self) -> int:
        kafka = self.settings.kafka
        log.info(
            "worker starting",
            input_topic=kafka.input_topic,
            group_id=kafka.group_id,
            output_topic=kafka.output_topic,
            model_id=self.engine.model_id,
            processing_guarantee=kafka.processing_guarantee,
        )
        try:
            self._commits.committer.start()
        except CommitError as exc:
            self._failure.fail(str(exc))
            return self._close(1)
        self._consumer.subscribe(
            [kafka.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        # Subscribed: waiting for an assignment is a ready state (a worker with no
        # partitions, one of more replicas than partitions, is not broken), once a
        # broker has answered.
        self.health.kafka_problem = self._client.reachability.problem()
        self.health.subscribed = True
        self._engine.start()
        try:
            while not self._stop.is_set() and not self._failure:
                self._poll_once()
            return self._shutdown()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- poll loop ----------------------------------------------------------------------

    def _poll_once(self) -> None:
        self.health.loop_turned()
        self.publisher.serve()  # delivery reports -> tracker.mark_done
        events = self.tracker.in_flight()
        self._backpressure.apply(self._consumer, events, self.tracker.bytes_in_flight())
        # Never take more than the in-flight limit leaves room for (paused: nothing comes).
        room = self._backpressure.room(events)
        messages = self._consumer.consume(
            max(1, min(MAX_CONSUME, room)), timeout=self.settings.kafka.poll_timeout_s
        )
        for message in messages:
            self._handle(message)
        self._commits.maybe_commit()
        self._update_gauges()
        self.health.kafka_problem = self._client.check(joined=self._joined)

    def _handle(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            self._client.on_consume_error(error)
            return
        record = to_record(message)
        if not self.tracker.owns(record.topic_partition):
            return  # fetched before a revoke; the new owner reads it
        self.tracker.track(record.topic_partition, record.offset, len(record.value))
        self.metrics.events_consumed.inc()
        try:
            event = parse_event(record, self.settings.flow.max_event_bytes)
        except EventError as exc:
            # Through the batcher like everything else: outcomes leave in input order,
            # which the exactly_once commit relies on.
            self.batcher.put(_resolved(FailedEvent.from_error(record, exc)))
            return
        self.batcher.put(self._pool.submit(self._prepare, record, event))

    def _prepare(self, record: InputRecord, event: Any) -> Item:
        """On a fetch thread: fetch, decode and crop; count what the crops hold."""
        settings = self.settings
        item = prepare_event(record, event, settings.fetch, self._decoder, settings.faces)
        attempts = item.fetch_attempts
        if attempts > 1:
            self.metrics.fetch_retries.inc(attempts - 1)
        if isinstance(item, PreparedEvent):
            held = sum(c.width * c.height * 3 for c in item.crops)
            self.tracker.add_size(record.topic_partition, record.offset, held)
        return item

    def _joined(self) -> bool:
        """Whether the consumer has a group member id (the coordinator answered)."""
        try:
            return bool(self._consumer.memberid())
        except (RuntimeError, KafkaException):
            return False

    def _on_statistics(self, stats_json: str) -> None:
        """librdkafka statistics (served by consume on the poll thread): consumer lag."""
        self._client.on_statistics(stats_json)
        try:
            lag = lag_from_statistics(stats_json)
        except (ValueError, TypeError, AttributeError) as exc:
            log.debug("unreadable client statistics", error=str(exc))
            return
        self.health.set_lag(lag)
        self.metrics.set_lag(lag)

    def _update_gauges(self) -> None:
        """In-flight, partition and GPU-memory gauges, at most once a second."""
        now = time.monotonic()
        if now - self._gauges_at < 1.0:
            return
        self._gauges_at = now
        self.metrics.in_flight.set(self.tracker.in_flight())
        assigned = len(self._consumer.assignment())
        self.metrics.assigned_partitions.set(assigned)
        self.metrics.paused_partitions.set(assigned if self._backpressure.paused else 0)
        self.metrics.gpu_memory.set(gpu_memory_bytes())

    # ---- rebalance callbacks (run inside consume(), on the poll thread) ------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._client.reached()
        for tp in partitions:
            self.tracker.assign((tp.topic, tp.partition))
        # The client assigns them after this callback returns; the next poll-loop turn
        # pauses or resumes them with the rest.
        self._backpressure.assigned()
        log.info("partitions assigned", partitions=[tp.partition for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        if self._closing:
            # Shutting down: the drain and the final commit already happened, and the
            # broker may be unreachable, so do not wait or commit again.
            for tp in revoked:
                self.tracker.revoke(tp)
            return
        # Let in-flight events of these partitions finish and be acknowledged, within a
        # bound; what is not done by then is dropped uncommitted for the new owner.
        deadline = time.monotonic() + self.settings.kafka.revoke_timeout_s
        while not self._failure and self.tracker.in_flight(revoked) and time.monotonic() < deadline:
            self.publisher.serve(0.05)
        # The commit and the revoke under one hold of the publish lock: an outcome of these
        # partitions that the engine thread produced between the two would go into the
        # next transaction without its offset, and the new owner would publish it again
        # (a duplicate for read_committed readers; found by the chaos soak).
        with self.publisher.lock:
            self._commits.commit(revoked, wait=True)  # the coordinator is up: it rebalances
            for tp in revoked:
                self.tracker.revoke(tp)
        self._backpressure.departed(consumer, partitions)
        log.info("partitions revoked", partitions=sorted(p for _, p in revoked))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost, not revoked: another member may own them already, so commit nothing.
        with self.publisher.lock:
            for tp in partitions:
                self.tracker.revoke((tp.topic, tp.partition))
        self._backpressure.departed(consumer, partitions)
        if self._commits.committer.transactional:
            # The open transaction may hold results of the lost partitions; committing it
            # would be fenced, and aborting it loses results of partitions we still own.
            self._failure.fail(
                "partitions lost in exactly_once mode; restarting from committed offsets"
            )
        log.warning("partitions lost", partitions=[tp.partition for tp in partitions])

    # ---- shutdown -----------------------------------------------------------------------

    def _shutdown(self) -> int:
        self.health.stopping = True
        deadline = time.monotonic() + self.settings.flow.drain_timeout_s
        self._consumer.pause(self._consumer.assignment())
        while not self._failure and self.tracker.in_flight() and time.monotonic() < deadline:
            self.publisher.serve(0.05)
            # Keep calling consume (paused: it returns nothing) to stay in the group.
            self._consumer.consume(1, timeout=0)
        self._engine.finish(timeout_s=max(0.0, deadline - time.monotonic()) + 1.0)
        if not self._failure:
            self.publisher.flush(max(1.0, deadline - time.monotonic()))
            self._commits.commit()
            self._commits.await_reports(self._consumer, deadline)
        return self._close(0 if not self._failure else 1)

    def _close(self, code: int) -> int:
        self._closing = True
        self._decoder.close()
        close_idle_connections()
        if code != 0:
            self._commits.committer.abort()
            # Undelivered outcomes must not be retried into a partition we no longer own.
            self._producer.purge()
        # close() leaves the group; with the broker gone it can block for long, and a
        # pod that must restart should not hang on it.
        finished = _run_bounded(self._consumer.close, CLOSE_TIMEOUT_S)
        finished = _run_bounded(self._producer.close, CLOSE_TIMEOUT_S) and finished
        self.closed_cleanly = finished
        counts = self.metrics.counts()
        log.info(
            "worker stopped",
            consumed=counts.consumed,
            results=counts.results,
            dead_letters=counts.dead_letters,
            dropped=counts.dropped,
            unfinished=self.tracker.in_flight(),
            failure=self._failure.reason,
            exit_code=code,
            closed_cleanly=finished,
        )
        return code


def _run_bounded(call: Callable[[], object], timeout_s: float) -> bool:
    """Run `call` on a daemon thread; False if it did not return within timeout_s."""
    thread = threading.Thread(target=call, name="kafka-close", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return not thread.is_alive()
