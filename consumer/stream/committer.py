"""How done offsets reach Kafka: a plain offset commit, or a transaction with the results.

at_least_once: results are produced and acknowledged first, then the contiguous done prefix
is committed with `Consumer.commit`. A crash between the two re-delivers that window.

exactly_once: results and dead letters are produced inside a Kafka transaction; at each
commit the producer is flushed (so the produced set of each partition equals its done
prefix, because outcomes are produced in input order), the offsets are added with
`send_offsets_to_transaction` and the transaction is committed. A read_committed reader
sees each result once; a zombie worker is fenced by the consumer group generation (KIP-447)
and by its transactional id.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import structlog
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

log = structlog.get_logger("consumer.stream.committer")

Offsets = dict[tuple[str, int], int]


class CommitError(RuntimeError):
    """The commit did not happen; `fatal` means the worker must stop without committing."""

    def __init__(self, message: str, *, fatal: bool) -> None:
        super().__init__(message)
        self.fatal = fatal


class Committer(Protocol):
    transactional: bool

    def start(self) -> None: ...

    def commit(self, offsets: Offsets, wait: bool = False) -> None: ...

    def abort(self) -> None: ...


def _partitions(offsets: Offsets) -> list[TopicPartition]:
    return [TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())]


def _describe(exc: KafkaException) -> tuple[str, Any]:
    error = exc.args[0] if exc.args else None
    return (str(error) if error is not None else str(exc)), error


class OffsetCommitter:
    """at_least_once: `Consumer.commit` of acknowledged offsets.

    Periodic commits are asynchronous: a synchronous commit blocks for as long as the
    group coordinator is unreachable, and the poll loop must keep serving delivery
    reports meanwhile (that is how a broker outage is noticed). The result arrives in the
    consumer's on_commit callback; a failed commit is simply sent again next time.
    """

    transactional = False

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer
        self.pending = 0  # asynchronous commits without an on_commit report yet

    def start(self) -> None:
        pass

    def commit(self, offsets: Offsets, wait: bool = False) -> None:
        if not offsets:
            return
        try:
            if not wait:
                self._consumer.commit(offsets=_partitions(offsets), asynchronous=True)
                self.pending += 1
                return
            self._consumer.commit(offsets=_partitions(offsets), asynchronous=False)
        except KafkaException as exc:
            text, error = _describe(exc)
            # Not fatal: the offsets stay committable and go with the next commit.
            raise CommitError(
                f"offset commit failed: {text}", fatal=bool(error is not None and error.fatal())
            ) from exc

    def abort(self) -> None:
        pass


# How long past its own timeout a transactional call may run before the process exits.
# librdkafka 2.16 can block in send_offsets_to_transaction far past the timeout it was
# given after a broker restart (confluentinc/librdkafka#5456, #5511; the chaos soak saw
# 6+ minutes): the worker then neither commits nor stops. Exiting is safe in exactly_once:
# the open transaction is aborted when the restarted worker's producer fences it.
HUNG_CALL_GRACE_S = 15.0


def _exit_hung(call: str, limit_s: float) -> None:
    log.error(
        "transactional call hung past its timeout; exiting so the worker restarts",
        call=call,
        limit_s=limit_s,
    )
    logging.shutdown()
    os._exit(70)  # EX_SOFTWARE; the supervisor or the pod restarts the worker


@contextlib.contextmanager
def _watchdog(call: str, timeout_s: float) -> Iterator[None]:
    """Exit the process if the block runs past `timeout_s` + HUNG_CALL_GRACE_S."""
    limit = timeout_s + HUNG_CALL_GRACE_S
    timer = threading.Timer(limit, _exit_hung, (call, limit))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class TransactionCommitter:
    """exactly_once: one open transaction at a time, committed with the input offsets."""

    transactional = True

    def __init__(self, consumer: Consumer, producer: Producer, timeout_s: float = 30.0) -> None:
        self._consumer = consumer
        self._producer = producer
        self._timeout_s = timeout_s
        self._open = False

    def start(self) -> None:
        try:
            # Fences an earlier incarnation with the same transactional.id and aborts
            # whatever transaction it left open.
            self._producer.init_transactions(self._timeout_s)
            self._begin()
        except KafkaException as exc:
            raise CommitError(f"init_transactions failed: {_describe(exc)[0]}", fatal=True) from exc

    def _begin(self) -> None:
        self._producer.begin_transaction()
        self._open = True

    def commit(self, offsets: Offsets, wait: bool = True) -> None:
        """Commit the open transaction (always synchronous, bounded by the timeout)."""
        if not self._open:
            raise CommitError("no open transaction", fatal=True)
        try:
            if offsets:
                with _watchdog("send_offsets_to_transaction", self._timeout_s):
                    self._producer.send_offsets_to_transaction(
                        _partitions(offsets),
                        self._consumer.consumer_group_metadata(),
                        self._timeout_s,
                    )
            with _watchdog("commit_transaction", self._timeout_s):
                self._producer.commit_transaction(self._timeout_s)
            self._open = False
        except KafkaException as exc:
            text, error = _describe(exc)
            if error is not None and error.retriable():
                # The outcome is unknown until a retry says so; the same call may be retried.
                raise CommitError(f"transaction commit to retry: {text}", fatal=False) from exc
            # Abortable or fatal: the results of this transaction are gone, and the
            # consumer's position is already past them. Only a restart from the committed
            # offsets re-processes them, so the worker stops.
            self.abort()
            raise CommitError(f"transaction commit failed: {text}", fatal=True) from exc
        self._begin()

    def abort(self) -> None:
        if not self._open:
            return
        self._open = False
        try:
            self._producer.abort_transaction(self._timeout_s)
        except KafkaException as exc:
            log.warning("abort_transaction failed", error=_describe(exc)[0])
