"""When to commit and what: the commit policy over the tracker, the publisher and a committer.

When: every `kafka.commit_interval_s`, or after `kafka.commit_every` events were
acknowledged, whichever comes first; for revoked partitions before they go; and once more
at shutdown. What: the contiguous acknowledged prefix of each partition (OffsetTracker);
in exactly_once mode the open transaction, which holds every outcome produced since the
last commit, after a flush has acknowledged all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from confluent_kafka import Consumer, KafkaError, TopicPartition

from consumer.config import KafkaSettings
from consumer.ops.metrics import WorkerMetrics
from consumer.stream.committer import CommitError, Committer, OffsetCommitter
from consumer.stream.failure import Failure
from consumer.stream.offsets import OffsetTracker, PartitionId
from consumer.stream.publisher import Publisher

log = structlog.get_logger("consumer.stream.commit_policy")


class CommitPolicy:
    """Commits from the poll thread (the loop, rebalance callbacks, shutdown)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        tracker: OffsetTracker,
        committer: Committer,
        publisher: Publisher,
        metrics: WorkerMetrics,
        failure: Failure,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval_s = kafka.commit_interval_s
        self._every = kafka.commit_every
        self._tracker = tracker
        self.committer = committer
        self._publisher = publisher
        self._metrics = metrics
        self._failure = failure
        self._clock = clock
        self._last_commit = clock()

    def due(self) -> bool:
        return (
            self._clock() - self._last_commit >= self._interval_s
            or self._tracker.done_since_commit() >= self._every
        )

    def maybe_commit(self) -> None:
        if self.due():
            self.commit()

    def commit(self, partitions: set[PartitionId] | None = None, wait: bool = False) -> None:
        """Commit what is done (of `partitions`, or all); exactly_once: the transaction."""
        if self._failure:
            return  # a failing worker commits nothing more; its successor re-reads
        self._last_commit = self._clock()
        publisher = self._publisher
        with publisher.lock:
            transactional = self.committer.transactional
            if transactional:
                if publisher.produced_since_commit == 0:
                    return
                publisher.flush()  # every produced outcome is now acknowledged
                partitions = None  # a transaction covers everything produced in it
            offsets = self._tracker.committable(partitions)
            if not offsets and not transactional:
                return
            try:
                self.committer.commit(offsets, wait=wait)
            except CommitError as exc:
                self._metrics.commits.labels(outcome="failed").inc()
                if exc.fatal:
                    self._failure.fail(str(exc))
                else:
                    log.warning("commit failed; will retry", error=str(exc))
                return
            publisher.produced_since_commit = 0
        self._tracker.mark_committed(offsets)
        self._metrics.commits.labels(outcome="ok").inc()
        log.debug("offsets committed", offsets={f"{t}:{p}": o for (t, p), o in offsets.items()})

    def on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """The consumer's on_commit callback: the report of an asynchronous commit."""
        if isinstance(self.committer, OffsetCommitter):
            self.committer.pending = max(0, self.committer.pending - 1)
        failed = {
            (tp.topic, tp.partition): tp.offset
            for tp in partitions
            if error is not None or tp.error is not None
        }
        if failed:
            # Sent again with the next commit; nothing is lost, only delayed.
            self._metrics.commits.labels(outcome="failed").inc()
            self._tracker.mark_commit_failed(failed)
            log.warning("commit failed; will retry", error=str(error or partitions[0].error))

    def await_reports(self, consumer: Consumer, deadline: float) -> None:
        """Serve on_commit reports of asynchronous commits until none is pending."""
        committer = self.committer
        while isinstance(committer, OffsetCommitter) and committer.pending:
            if time.monotonic() >= deadline:
                log.warning("shutting down with an unconfirmed offset commit")
                return
            consumer.consume(1, timeout=0.05)
