"""Backpressure: pause the whole assignment while too much is in flight, resume below a mark.

Events in flight (read, not yet acknowledged) and the bytes they hold (the record and its
face crops) are both bounded: a backlog of large photos must not exhaust memory, and a
backlog of small ones must not build a queue longer than a batch or two. Pausing is a
consumer-side flag per partition, so it is applied again after every rebalance, and taken
off partitions on their way out (librdkafka keeps the flag after unassignment).
"""

from __future__ import annotations

from typing import Protocol

import structlog
from confluent_kafka import KafkaException, TopicPartition

from consumer.config import FlowSettings

log = structlog.get_logger("consumer.stream.backpressure")


class Pausable(Protocol):
    """What backpressure needs of the consumer (confluent-kafka's, or the in-memory one)."""

    def assignment(self) -> list[TopicPartition]: ...

    def pause(self, partitions: list[TopicPartition]) -> None: ...

    def resume(self, partitions: list[TopicPartition]) -> None: ...


class Backpressure:
    """Decides pause or resume from what is in flight; applies it to the consumer."""

    def __init__(self, flow: FlowSettings) -> None:
        self._flow = flow
        self.paused = False
        self._assignment_changed = False

    def room(self, events: int) -> int:
        """How many more events fit in flight."""
        return self._flow.max_in_flight - events

    def apply(self, consumer: Pausable, events: int, held_bytes: int) -> None:
        """Pause or resume the consumer's assignment given `events` and `held_bytes` in flight."""
        flow = self._flow
        was_paused = self.paused
        if events >= flow.max_in_flight or held_bytes >= flow.max_in_flight_bytes:
            self.paused = True
        elif events <= flow.resume_below and held_bytes < flow.max_in_flight_bytes // 2:
            self.paused = False
        if self.paused == was_paused and not self._assignment_changed:
            return
        # Re-applied after every rebalance too: new partitions follow the current state.
        assignment = consumer.assignment()
        if self.paused:
            consumer.pause(assignment)
        else:
            consumer.resume(assignment)
        self._assignment_changed = False
        if self.paused != was_paused:
            log.debug(
                "paused partitions" if self.paused else "resumed partitions",
                in_flight=events,
                bytes_in_flight=held_bytes,
            )

    def assigned(self) -> None:
        """Partitions were assigned: the next `apply` pauses or resumes them with the rest."""
        self._assignment_changed = True

    def departed(self, consumer: Pausable, partitions: list[TopicPartition]) -> None:
        """Partitions were revoked or lost: clear their pause flag on the way out.

        librdkafka keeps a partition's pause flag after it is unassigned: if this worker
        got the partition back later it would stay paused for good.
        """
        try:
            consumer.resume(partitions)
        except KafkaException as exc:
            log.debug("resume of departing partitions failed", error=str(exc))
        self._assignment_changed = True
