"""Reads the summaries topic on a thread: the last minutes first, then what arrives.

No consumer group joins and nothing is committed: every page server reads every partition
(`assign`), starting at the offsets of `history_s` ago (`offsets_for_times`), so a page
opened now shows the last minutes at once, and any number of dashboards can run. Only
committed records are read (read_committed): a summarizer's aborted transaction never
shows up on the page.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from pydantic import ValidationError

from consumer.config import KafkaSettings
from consumer.stream.kafka_io import consumer_config
from schemas.summary import WindowSummary

log = structlog.get_logger("consumer.dashboard.reader")

_TOPIC_RECHECK_S = 30.0  # new partitions of the topic are picked up this often
_WARN_EVERY_S = 60.0


def reader_config(kafka: KafkaSettings) -> dict[str, Any]:
    """The worker's consumer settings (brokers, security, overrides) for a reader that never
    joins its group: no static membership (that id is a worker pod's), a group of its own."""
    config = consumer_config(kafka)
    config.pop("group.instance.id", None)
    config.pop("partition.assignment.strategy", None)
    config["group.id"] = f"{kafka.group_id}.dashboard"
    config["isolation.level"] = "read_committed"
    return config


class SummaryReader:
    """Feeds every window summary of `topic` to `on_summary`, on a daemon thread."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        history_s: float,
        on_summary: Callable[[WindowSummary], object],
        poll_s: float = 0.5,
    ) -> None:
        self.topic = topic
        self.history_s = history_s
        self._config = reader_config(kafka)
        self._on_summary = on_summary
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._state = "starting"
        self._failed: str | None = None
        self.read = 0
        self.invalid = 0
        self._warned_at = 0.0
        self._thread = threading.Thread(target=self._run, name="dashboard-reader", daemon=True)

    def start(self) -> SummaryReader:
        self._thread.start()
        return self

    def status(self) -> tuple[bool, str]:
        """(alive, what it is doing) for /healthz."""
        if self._failed is not None:
            return False, f"summaries reader stopped: {self._failed}"
        return True, f"{self._state}; {self.read} summaries read, {self.invalid} invalid"

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        consumer = Consumer(self._config)
        try:
            partitions: set[int] = set()
            while not partitions and not self._stop.is_set():
                partitions = self._start(consumer)
            checked = time.monotonic()
            while not self._stop.is_set():
                for message in consumer.consume(500, timeout=self._poll_s):
                    self._handle(message)
                if time.monotonic() - checked > _TOPIC_RECHECK_S:
                    checked = time.monotonic()
                    grown = self._partitions(consumer) - partitions
                    if grown:
                        self._assign(consumer, grown, added_later=True)
                        partitions |= grown
        except Exception as exc:  # reported by /healthz and the log
            self._failed = str(exc)
            log.error("summaries reader stopped", topic=self.topic, error=str(exc))
        finally:
            consumer.close()

    def _start(self, consumer: Consumer) -> set[int]:
        """Wait for the topic, then assign it from `history_s` ago; set() to try again.

        Brokers that do not answer (yet), a topic not created yet, or one this principal
        may not describe are waited out, with a warning a minute: the page is up meanwhile
        and says so, and shows the summaries once they can be read.
        """
        self._state = f"waiting for topic {self.topic}"
        partitions = self._partitions(consumer)
        if not partitions:
            self._stop.wait(2.0)
            return set()
        try:
            self._assign(consumer, partitions, added_later=False)
        except KafkaException as exc:
            self._warn("cannot look up the start offsets; trying again", error=str(exc))
            self._stop.wait(2.0)
            return set()
        return partitions

    def _partitions(self, consumer: Consumer) -> set[int]:
        """The topic's partitions now; set() (and a warning) when they cannot be listed."""
        try:
            # Short: a stop (SIGTERM) waits for this call when the brokers do not answer.
            meta = consumer.list_topics(self.topic, timeout=2).topics.get(self.topic)
        except KafkaException as exc:
            self._warn("cannot list the summaries topic", error=str(exc))
            return set()
        if meta is None or meta.error is not None or not meta.partitions:
            self._warn("summaries topic not readable yet", error=str(meta and meta.error))
            return set()
        return set(meta.partitions)

    def _assign(self, consumer: Consumer, partitions: set[int], added_later: bool) -> None:
        # incremental_assign both times: it adds to the assignment without touching the
        # positions of partitions already being read.
        if added_later:  # partitions created after the start: from their first record
            consumer.incremental_assign([TopicPartition(self.topic, p, 0) for p in partitions])
            return
        since_ms = int((time.time() - self.history_s) * 1000)
        # The ends first: a partition with nothing written since since_ms starts there, an
        # offset fixed now. Assigning OFFSET_END instead would resolve at the first fetch and
        # skip a summary written in between.
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=30)[1]
            for p in sorted(partitions)
        }
        wanted = [TopicPartition(self.topic, p, since_ms) for p in sorted(partitions)]
        # Per partition, the first offset written at or after since_ms; -1 where nothing was.
        found = consumer.offsets_for_times(wanted, timeout=30)
        starts = [
            tp if tp.offset >= 0 else TopicPartition(self.topic, tp.partition, ends[tp.partition])
            for tp in found
        ]
        consumer.incremental_assign(starts)
        self._state = f"reading {self.topic} ({len(starts)} partitions)"
        log.info(
            "reading summaries",
            topic=self.topic,
            partitions=len(starts),
            since_minutes=round(self.history_s / 60, 2),
        )

    def _handle(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.fatal():
                raise KafkaException(error)
            if error.code() != KafkaError._PARTITION_EOF:
                self._warn("summaries topic error", error=error.str())
            return
        try:
            summary = WindowSummary.model_validate_json(message.value() or b"")
        except ValidationError as exc:
            self.invalid += 1
            self._warn(
                "not a window summary; skipped",
                partition=message.partition(),
                offset=message.offset(),
                error=str(exc.errors(include_input=False)[:1]),
            )
            return
        self.read += 1
        self._on_summary(summary)

    def _warn(self, event: str, **fields: Any) -> None:
        """At most one warning a minute: a bad topic must not flood the log."""
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning(event, topic=self.topic, **fields)
