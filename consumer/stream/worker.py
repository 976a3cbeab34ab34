"""One worker process: poll -> validate -> fetch (threads) -> batch -> engine -> publish -> commit.

Threads:
- the poll loop (the caller of `Worker.run`) owns the consumer: it polls, validates, hands
  fetches to the pool, serves delivery reports, pauses/resumes, rebalances and commits;
- a pool of fetch threads downloads, decodes and crops;
- one engine thread runs the model on micro-batches and produces the outcomes, in input
  order, under the publish lock.

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
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from consumer.config import WorkerSettings
from consumer.decode.pool import Decoder, make_decoder
from consumer.errors import EventError
from consumer.fetch.pool import close_idle_connections
from consumer.ops.metrics import HealthState, WorkerMetrics, gpu_memory_bytes, lag_from_statistics
from consumer.stream.batch_runner import BatchRunner, Classifier
from consumer.stream.batching import MicroBatcher
from consumer.stream.client_errors import BrokerReachability, Throttle, any_broker_up
from consumer.stream.committer import CommitError, Committer, OffsetCommitter, TransactionCommitter
from consumer.stream.kafka_io import consumer_config, producer_config, to_record
from consumer.stream.offsets import OffsetTracker
from consumer.stream.records import FailedEvent, InputRecord, Item, Outcome, PreparedEvent
from consumer.stream.stages import parse_event, prepare_event

log = structlog.get_logger("consumer.stream.worker")

CLOSE_TIMEOUT_S = 10.0
# Client errors that retrying cannot fix: bad credentials or missing ACLs.
_AUTH_ERRORS = frozenset(
    {
        KafkaError._AUTHENTICATION,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError._SSL,  # TLS handshake: the broker's certificate cannot be verified
    }
)
# An mTLS listener that rejects our certificate shows up as a transport error, like a
# network outage; only the TLS alert in the text tells it apart.
_TLS_ALERT = "ssl/tls alert"
# Client errors that mean no broker can be reached (at the moment).
_UNREACHABLE_ERRORS = frozenset(
    {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE}
)

__all__ = ["Classifier", "Worker", "WorkerStats"]


class WorkerStats:
    """Counters for the summary line and tests; written by several threads under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.consumed = 0
        self.results = 0
        self.dead_letters = 0
        self.dropped = 0  # outcomes of partitions revoked before they were published
        self.batches = 0
        self.faces = 0
        self.commits = 0

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


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
        self.stats = WorkerStats()
        self.metrics = metrics or WorkerMetrics()
        self.health = health or HealthState(
            settings.health.loop_stall_s, settings.health.stall_timeout_s
        )
        self._gauges_at = 0.0
        self.tracker = OffsetTracker()
        kafka = settings.kafka
        # librdkafka reports each failed connection attempt: say each kind once in a
        # while, and an unreachable cluster once, plainly (consumer.stream.client_errors).
        self._client_errors = Throttle()
        self._reach = BrokerReachability(kafka.bootstrap_servers)
        self.batcher = MicroBatcher(
            settings.batch.max_batch_size, settings.batch.max_wait_ms / 1000.0
        )
        self.runner = BatchRunner(engine, kafka.output_topic, kafka.dead_letter_topic)
        self._consumer = consumer_factory(
            consumer_config(
                kafka,
                error_cb=self._on_client_error,
                on_commit=self._on_commit,
                stats_cb=self._on_statistics,
                statistics_interval_s=settings.health.statistics_interval_s,
            )
        )
        self._producer = producer_factory(producer_config(kafka, error_cb=self._on_client_error))
        self._committer: Committer = (
            TransactionCommitter(self._consumer, self._producer)
            if kafka.processing_guarantee == "exactly_once"
            else OffsetCommitter(self._consumer)
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
        # Held while producing a batch's outcomes and while committing or revoking, so a
        # commit sees every produced outcome and nothing is produced for a revoked partition.
        self._publish_lock = threading.Lock()
        self._produced_since_commit = 0
        self._stop = threading.Event()
        self._engine_stop = threading.Event()
        self._fatal: str | None = None
        self._paused = False
        self._assignment_changed = False
        self._closing = False
        self.closed_cleanly = True
        self._last_commit = time.monotonic()
        self._engine_thread = threading.Thread(target=self._engine_loop, name="engine", daemon=True)

    # ---- control -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop taking new events; run() drains what is in flight and returns."""
        self.health.stopping = True
        self._stop.set()

    @property
    def failure(self) -> str | None:
        return self._fatal

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
            self._committer.start()
        except CommitError as exc:
            self._fail(str(exc))
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
        self.health.kafka_problem = self._reach.problem()
        self.health.subscribed = True
        self._engine_thread.start()
        try:
            while not self._stop.is_set() and self._fatal is None:
                self._poll_once()
            return self._shutdown()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- poll loop ----------------------------------------------------------------------

    def _poll_once(self) -> None:
        self.health.loop_turned()
        self._producer.poll(0)  # serve delivery reports -> tracker.mark_done
        room = self._apply_backpressure()
        # Never take more than the in-flight limit leaves room for (paused: nothing comes).
        messages = self._consumer.consume(
            max(1, min(500, room)), timeout=self.settings.kafka.poll_timeout_s
        )
        for message in messages:
            self._handle(message)
        self._maybe_commit()
        self._update_gauges()
        self._watch_brokers()

    def _handle(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.fatal():
                self._fail(f"fatal consumer error: {error}")
            elif error.code() != KafkaError._PARTITION_EOF:
                suppressed = self._client_errors.admit(("consume", error.code()))
                if suppressed is not None:
                    log.warning("consumer error", error=str(error), suppressed=suppressed)
            return
        record = to_record(message)
        if not self.tracker.owns(record.topic_partition):
            return  # fetched before a revoke; the new owner reads it
        self.tracker.track(record.topic_partition, record.offset, len(record.value))
        self.stats.add(consumed=1)
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
        item = prepare_event(record, event, self.settings.fetch, self._decoder)
        attempts = item.fetch_attempts
        if attempts > 1:
            self.metrics.fetch_retries.inc(attempts - 1)
        if isinstance(item, PreparedEvent):
            held = sum(c.width * c.height * 3 for c in item.crops)
            self.tracker.add_size(record.topic_partition, record.offset, held)
        return item

    def _apply_backpressure(self) -> int:
        """Pause or resume the assignment; returns how many more events fit in flight."""
        flow = self.settings.flow
        events, held = self.tracker.in_flight(), self.tracker.bytes_in_flight()
        was_paused = self._paused
        if events >= flow.max_in_flight or held >= flow.max_in_flight_bytes:
            self._paused = True
        elif events <= flow.resume_below and held < flow.max_in_flight_bytes // 2:
            self._paused = False
        if self._paused != was_paused or self._assignment_changed:
            # Re-applied after every rebalance too: newly assigned partitions must follow
            # the current state.
            assignment = self._consumer.assignment()
            if self._paused:
                self._consumer.pause(assignment)
            else:
                self._consumer.resume(assignment)
            self._assignment_changed = False
            if self._paused != was_paused:
                log.debug(
                    "paused partitions" if self._paused else "resumed partitions",
                    in_flight=events,
                    bytes_in_flight=held,
                )
        return flow.max_in_flight - events

    # ---- engine thread ------------------------------------------------------------------

    def _engine_loop(self) -> None:
        try:
            while True:
                batch = self.batcher.next_batch(self._engine_stop)
                if not batch:
                    if self._engine_stop.is_set():
                        return
                    continue
                started = time.monotonic()
                for item in batch:
                    self.metrics.queue_wait.observe(started - item.record.read_at)
                outcomes = self.runner.run(batch)
                faces = sum(len(i.crops) for i in batch if isinstance(i, PreparedEvent))
                self.metrics.model_time.observe(time.monotonic() - started)
                self.metrics.batch_faces.observe(faces)
                cap = self.settings.batch.max_batch_size
                self.metrics.batch_face_fill_ratio.observe(faces / cap)
                self.metrics.batch_fill_ratio.observe(len(batch) / cap)  # deprecated
                self.stats.add(batches=1, faces=faces)
                with self._publish_lock:
                    for outcome in outcomes:
                        self._publish(outcome)
        except Exception as exc:  # a bug here must end the process, not hang it
            log.exception("engine thread crashed")
            self._fail(f"engine thread crashed: {type(exc).__name__}: {exc}")

    # ---- publishing and committing ------------------------------------------------------

    def _publish(self, outcome: Outcome) -> None:
        """Produce one outcome; call with the publish lock held."""
        record = outcome.record
        if not self.tracker.owns(record.topic_partition):
            self.stats.add(dropped=1)  # revoked: its new owner processes it again
            return
        with structlog.contextvars.bound_contextvars(
            event_id=outcome.event_id,
            stream_id=outcome.stream_id,
            partition=record.partition,
            offset=record.offset,
        ):
            if outcome.is_dead_letter:
                log.warning("dead letter", topic=record.topic, reason=outcome.reason)
            else:
                log.debug("result published", topic=outcome.topic)

        def delivered(error: KafkaError | None, _message: Message) -> None:
            self._on_delivery(outcome, error)

        while True:
            try:
                self._producer.produce(
                    outcome.topic,
                    value=outcome.value,
                    key=outcome.key,
                    headers=outcome.headers,
                    on_delivery=delivered,
                )
                self._produced_since_commit += 1
                return
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain it

    def _on_delivery(self, outcome: Outcome, error: KafkaError | None) -> None:
        record = outcome.record
        if error is not None:
            # Never commit past an unacknowledged result: stop, and let the events be
            # redelivered to whoever owns the partition next.
            self._fail(
                f"result for {record.topic}[{record.partition}]@{record.offset} "
                f"was not delivered: {error}"
            )
            return
        self._broker_reached()
        if outcome.is_dead_letter:
            self.stats.add(dead_letters=1)
            self.metrics.dead_letters.labels(reason=outcome.label).inc()
        else:
            self.stats.add(results=1)
            self.metrics.results_published.labels(status=outcome.label).inc()
        now = time.time()
        if outcome.captured_at is not None:
            self.metrics.capture_to_publish.observe(max(0.0, now - outcome.captured_at.timestamp()))
        if record.timestamp_ms is not None:
            self.metrics.kafka_to_publish.observe(max(0.0, now - record.timestamp_ms / 1000))
        self.tracker.mark_done(record.topic_partition, record.offset)
        self.health.progressed()

    def _on_client_error(self, error: KafkaError) -> None:
        # Served from poll/consume on the poll thread. Most errors are transient and
        # librdkafka recovers; a fatal one (e.g. a fenced idempotent producer) is not.
        if error.fatal():
            self._fail(f"fatal Kafka client error: {error}")
        elif error.code() in _AUTH_ERRORS or (
            error.code() == KafkaError._TRANSPORT and _TLS_ALERT in error.str().lower()
        ):
            # librdkafka would retry wrong credentials forever while the worker looks
            # alive and does nothing: stop, and say which settings to check.
            self._fail(
                f"Kafka authentication or authorization failed: {error.str()}; check the "
                "sasl.* / ssl.* entries of kafka.common_config (or the topic and group ACLs)"
            )
        else:
            if error.code() in _UNREACHABLE_ERRORS:
                self._reach.failed(error.str())
            # librdkafka retries these; each attempt that fails calls back again.
            suppressed = self._client_errors.admit(error.code())
            if suppressed is not None:
                log.warning(
                    "kafka client error",
                    error=error.str(),
                    code=error.name(),
                    suppressed=suppressed,
                )

    def _broker_reached(self) -> None:
        outage = self._reach.reached()
        if outage is not None:
            log.info(
                "reached the Kafka brokers again",
                bootstrap_servers=self.settings.kafka.bootstrap_servers,
                after_s=round(outage, 1),
            )

    def _watch_brokers(self) -> None:
        """Say plainly when the cluster cannot be reached; keep /readyz in step."""
        if not self._reach.ever_reached and self._member_id() is not None:
            self._broker_reached()  # joined the group: the coordinator answered
        line = self._reach.check()
        if line is not None:
            log.error(line, bootstrap_servers=self.settings.kafka.bootstrap_servers)
        self.health.kafka_problem = self._reach.problem()

    def _member_id(self) -> str | None:
        try:
            member: str | None = self._consumer.memberid()
        except (RuntimeError, KafkaException):
            return None
        return member or None

    def _maybe_commit(self, force: bool = False) -> None:
        kafka = self.settings.kafka
        due = (
            time.monotonic() - self._last_commit >= kafka.commit_interval_s
            or self.tracker.done_since_commit() >= kafka.commit_every
        )
        if force or due:
            self._commit()

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        if isinstance(self._committer, OffsetCommitter):
            self._committer.pending = max(0, self._committer.pending - 1)
        failed = {
            (tp.topic, tp.partition): tp.offset
            for tp in partitions
            if error is not None or tp.error is not None
        }
        if failed:
            # Sent again with the next commit; nothing is lost, only delayed.
            self.metrics.commits.labels(outcome="failed").inc()
            self.tracker.mark_commit_failed(failed)
            log.warning("commit failed; will retry", error=str(error or partitions[0].error))

    def _commit(self, partitions: set[tuple[str, int]] | None = None, wait: bool = False) -> None:
        """Commit what is done; in exactly_once mode, the open transaction with it."""
        if self._fatal is not None:
            return
        self._last_commit = time.monotonic()
        with self._publish_lock:
            if self._committer.transactional:
                if self._produced_since_commit == 0:
                    return
                self._producer.flush()  # every produced outcome is now acknowledged
                partitions = None  # a transaction covers everything produced in it
            offsets = self.tracker.committable(partitions)
            if not offsets and not self._committer.transactional:
                return
            try:
                self._committer.commit(offsets, wait=wait)
            except CommitError as exc:
                self.metrics.commits.labels(outcome="failed").inc()
                if exc.fatal:
                    self._fail(str(exc))
                else:
                    log.warning("commit failed; will retry", error=str(exc))
                return
            self._produced_since_commit = 0
        self.tracker.mark_committed(offsets)
        self.stats.add(commits=1)
        self.metrics.commits.labels(outcome="ok").inc()
        log.debug("offsets committed", offsets={f"{t}:{p}": o for (t, p), o in offsets.items()})

    def _on_statistics(self, stats_json: str) -> None:
        """librdkafka statistics (served by consume on the poll thread): consumer lag."""
        if any_broker_up(stats_json):
            self._broker_reached()
        try:
            lag = lag_from_statistics(stats_json)
        except (ValueError, TypeError, AttributeError) as exc:
            log.debug("unreadable client statistics", error=str(exc))
            return
        self.health.set_lag(lag)
        self.metrics.consumer_lag.clear()  # partitions that left must not linger
        for (topic, partition), value in lag.items():
            self.metrics.consumer_lag.labels(topic=topic, partition=str(partition)).set(value)

    def _update_gauges(self) -> None:
        """In-flight, partition and GPU-memory gauges, at most once a second."""
        now = time.monotonic()
        if now - self._gauges_at < 1.0:
            return
        self._gauges_at = now
        self.metrics.in_flight.set(self.tracker.in_flight())
        assigned = len(self._consumer.assignment())
        self.metrics.assigned_partitions.set(assigned)
        self.metrics.paused_partitions.set(assigned if self._paused else 0)
        self.metrics.gpu_memory.set(gpu_memory_bytes())

    def _fail(self, reason: str) -> None:
        if self._fatal is None:
            log.error("worker failing", reason=reason)
            self._fatal = reason

    # ---- rebalance callbacks (run inside consume(), on the poll thread) ------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._broker_reached()
        for tp in partitions:
            self.tracker.assign((tp.topic, tp.partition))
        # The client assigns them after this callback returns; the next poll-loop turn
        # pauses or resumes them with the rest.
        self._assignment_changed = True
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
        while (
            self._fatal is None and self.tracker.in_flight(revoked) and time.monotonic() < deadline
        ):
            self._producer.poll(0.05)
        self._commit(revoked, wait=True)  # the coordinator is up: it is running the rebalance
        with self._publish_lock:  # after this, nothing more is produced for them
            for tp in revoked:
                self.tracker.revoke(tp)
        self._forget_pause(consumer, partitions)
        log.info("partitions revoked", partitions=sorted(p for _, p in revoked))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost, not revoked: another member may own them already, so commit nothing.
        with self._publish_lock:
            for tp in partitions:
                self.tracker.revoke((tp.topic, tp.partition))
        self._forget_pause(consumer, partitions)
        if self._committer.transactional:
            # The open transaction may hold results of the lost partitions; committing it
            # would be fenced, and aborting it loses results of partitions we still own.
            self._fail("partitions lost in exactly_once mode; restarting from committed offsets")
        log.warning("partitions lost", partitions=[tp.partition for tp in partitions])

    def _forget_pause(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # librdkafka keeps a partition's pause flag after it is unassigned: if this worker
        # got the partition back later it would stay paused for good. Clear it on the way out.
        try:
            consumer.resume(partitions)
        except KafkaException as exc:
            log.debug("resume of departing partitions failed", error=str(exc))
        self._assignment_changed = True

    # ---- shutdown -----------------------------------------------------------------------

    def _shutdown(self) -> int:
        self.health.stopping = True
        deadline = time.monotonic() + self.settings.flow.drain_timeout_s
        self._consumer.pause(self._consumer.assignment())
        while self._fatal is None and self.tracker.in_flight() and time.monotonic() < deadline:
            self._producer.poll(0.05)
            # Keep calling consume (paused: it returns nothing) to stay in the group.
            self._consumer.consume(1, timeout=0)
        self._engine_stop.set()
        self._engine_thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        if self._fatal is None:
            self._producer.flush(max(1.0, deadline - time.monotonic()))
            self._maybe_commit(force=True)
            self._await_commits(deadline)
        return self._close(0 if self._fatal is None else 1)

    def _await_commits(self, deadline: float) -> None:
        """Serve on_commit reports of asynchronous commits until none is pending."""
        committer = self._committer
        while isinstance(committer, OffsetCommitter) and committer.pending:
            if time.monotonic() >= deadline:
                log.warning("shutting down with an unconfirmed offset commit")
                return
            self._consumer.consume(1, timeout=0.05)

    def _close(self, code: int) -> int:
        self._closing = True
        self._decoder.close()
        close_idle_connections()
        if code != 0:
            self._committer.abort()
            # Undelivered outcomes must not be retried into a partition we no longer own.
            self._producer.purge()
        # close() leaves the group; with the broker gone it can block for long, and a
        # pod that must restart should not hang on it.
        finished = _run_bounded(self._consumer.close, CLOSE_TIMEOUT_S)
        finished = _run_bounded(self._producer.close, CLOSE_TIMEOUT_S) and finished
        self.closed_cleanly = finished
        log.info(
            "worker stopped",
            consumed=self.stats.consumed,
            results=self.stats.results,
            dead_letters=self.stats.dead_letters,
            dropped=self.stats.dropped,
            unfinished=self.tracker.in_flight(),
            failure=self._fatal,
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
