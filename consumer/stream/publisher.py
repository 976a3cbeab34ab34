"""Publishing outcomes, and turning the broker's acknowledgements into done offsets.

Outcomes are produced in input order under `lock`; the committer takes the same lock, so
a commit sees every produced outcome, and the rebalance callbacks take it too, so nothing
is produced for a partition after it was revoked. An input offset becomes done (and
committable, see OffsetTracker) only in the delivery report of its outcome.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import structlog
from confluent_kafka import KafkaError, Message, Producer

from consumer.ops.metrics import HealthState, WorkerMetrics
from consumer.stream.failure import Failure
from consumer.stream.offsets import OffsetTracker
from consumer.stream.records import Outcome

log = structlog.get_logger("consumer.stream.publisher")

# How long to serve delivery reports when the producer's local queue is full.
_QUEUE_FULL_POLL_S = 0.05


class Publisher:
    """Produces outcomes and serves their delivery reports (on the poll thread)."""

    def __init__(
        self,
        producer: Producer,
        tracker: OffsetTracker,
        metrics: WorkerMetrics,
        health: HealthState,
        failure: Failure,
        *,
        on_delivered: Callable[[], None],
    ) -> None:
        self._producer = producer
        self._tracker = tracker
        self._metrics = metrics
        self._health = health
        self._failure = failure
        self._on_delivered = on_delivered  # a delivery is a sign of a live broker
        # Re-entrant: a revoke holds it across the commit, which takes it too.
        self.lock = threading.RLock()
        self.produced_since_commit = 0  # read and reset by the commit, under `lock`

    def publish(self, outcomes: Sequence[Outcome]) -> None:
        """Produce a batch's outcomes, in order."""
        with self.lock:
            for outcome in outcomes:
                self._produce(outcome)

    def serve(self, timeout_s: float = 0.0) -> None:
        """Serve delivery reports (each marks its input offset done)."""
        self._producer.poll(timeout_s)

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every produced outcome is acknowledged (or `timeout_s` passes)."""
        if timeout_s is None:
            self._producer.flush()
        else:
            self._producer.flush(timeout_s)

    def _produce(self, outcome: Outcome) -> None:
        record = outcome.record
        if not self._tracker.owns(record.topic_partition):
            # Revoked while in the model: its new owner processes it again.
            self._metrics.outcomes_dropped.inc()
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
            self._delivered(outcome, error)

        while True:
            try:
                self._producer.produce(
                    outcome.topic,
                    value=outcome.value,
                    key=outcome.key,
                    headers=outcome.headers,
                    on_delivery=delivered,
                )
                self.produced_since_commit += 1
                return
            except BufferError:
                self._producer.poll(_QUEUE_FULL_POLL_S)  # let deliveries drain the queue

    def _delivered(self, outcome: Outcome, error: KafkaError | None) -> None:
        record = outcome.record
        if error is not None:
            # Never commit past an unacknowledged result: stop, and let the events be
            # redelivered to whoever owns the partition next.
            self._failure.fail(
                f"result for {record.topic}[{record.partition}]@{record.offset} "
                f"was not delivered: {error}"
            )
            return
        self._on_delivered()
        metrics = self._metrics
        if outcome.is_dead_letter:
            metrics.dead_letters.labels(reason=outcome.label).inc()
        else:
            metrics.results_published.labels(status=outcome.label).inc()
            metrics.count_faces(outcome.face_labels)
        now = time.time()
        if outcome.captured_at is not None:
            metrics.capture_to_publish.observe(max(0.0, now - outcome.captured_at.timestamp()))
        if record.timestamp_ms is not None:
            metrics.kafka_to_publish.observe(max(0.0, now - record.timestamp_ms / 1000))
        self._tracker.mark_done(record.topic_partition, record.offset)
        self._health.progressed()
