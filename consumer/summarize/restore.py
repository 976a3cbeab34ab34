"""Reading one partition's state back from the state topic, when it is assigned."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from consumer.summarize.state import Restorer, StateError
from consumer.summarize.windows import PartitionWindows

log = structlog.get_logger("consumer.summarize")


class RestoreError(RuntimeError):
    """A partition's state could not be read back; the summarizer stops."""


class StateReader:
    """Reads state partitions to their end, read_committed, with a consumer that is in no
    group (assign only, never commits)."""

    def __init__(
        self,
        consumer: Consumer,
        topic: str,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        alive: Callable[[], None] = lambda: None,
    ) -> None:
        self.consumer = consumer
        self.topic = topic
        self.timeout_s = timeout_s
        self._clock = clock
        self._alive = alive  # called while reading: restoring is progress, not a stall

    def read(self, partition: int, windows: PartitionWindows, committed: int) -> Restorer:
        """Apply partition's records to `windows`, up to the group's committed offset.

        The state's position record must reach `committed` (the results offset the group
        committed, negative for none): a transaction's markers reach the group's offsets
        and the state partition one after the other, so right after a commit the state
        may still end before it. Reading goes on until it does, or the timeout.
        """
        restorer = Restorer(windows)
        deadline = self._clock() + self.timeout_s
        self.consumer.assign([TopicPartition(self.topic, partition, OFFSET_BEGINNING)])
        next_offset = 0
        try:
            while True:
                next_offset = self._read_to_end(partition, restorer, next_offset, deadline)
                position = restorer.position
                if committed < 0 or (position is not None and position >= committed):
                    return restorer
                if self._clock() > deadline:
                    if position is None:
                        return restorer  # no state at all: the state topic is new or emptied
                    raise RestoreError(
                        f"state of results partition {partition} is at offset {position} but "
                        f"the group committed {committed}: the state topic {self.topic} lost "
                        "records (recreated?); start over with a new summarize.group_id and "
                        "summarize.state_topic"
                    )
                time.sleep(0.1)
                self._alive()
        finally:
            self.consumer.unassign()

    def _read_to_end(
        self, partition: int, restorer: Restorer, next_offset: int, deadline: float
    ) -> int:
        tp = TopicPartition(self.topic, partition)
        end = self.consumer.get_watermark_offsets(tp, self.timeout_s)[1]  # read_committed: LSO
        while next_offset < end:
            if self._clock() > deadline:
                raise RestoreError(
                    f"restoring {self.topic}[{partition}] took over {self.timeout_s:.0f} s "
                    f"(at offset {next_offset} of {end})"
                )
            # consume() waits out its whole timeout unless 1000 records come: keep it short.
            for msg in self.consumer.consume(1000, timeout=0.05):
                error = msg.error()
                if error is None:
                    try:
                        restorer.apply(msg.key(), msg.value())
                    except StateError as exc:
                        raise RestoreError(
                            f"{self.topic}[{partition}]@{msg.offset()}: {exc}"
                        ) from exc
                    next_offset = int(msg.offset() or 0) + 1
                elif error.code() == KafkaError._PARTITION_EOF:
                    next_offset = max(next_offset, int(msg.offset() or 0))
                else:
                    raise RestoreError(f"restoring {self.topic}[{partition}]: {error}")
            self._alive()
        return next_offset


def start_position(partition: int, state_position: int | None, committed: int) -> int:
    """Where to consume a restored partition from (negative: the group's offset, or
    auto.offset.reset): the state's own position, which is what the state counted."""
    if state_position is None:
        if committed >= 0:
            log.warning(
                "no state for a partition the group has offsets for: the state topic is new "
                "or was emptied; windows open before are counted from here on",
                partition=partition,
                committed=committed,
            )
        return committed
    if 0 <= committed < state_position:
        log.warning(
            "the group's offset is behind the state (offsets reset by hand?); going on from "
            "the state's position, so that nothing is counted twice",
            partition=partition,
            committed=committed,
            position=state_position,
        )
    return state_position
