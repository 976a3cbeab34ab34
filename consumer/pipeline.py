"""One worker process: poll -> validate -> fetch (threads) -> batch -> engine -> publish -> commit.

Threads:
- the poll loop (the caller of `Worker.run`) owns the consumer: it polls, validates, hands
  fetches to the pool, serves delivery reports, pauses/resumes and commits;
- a pool of fetch threads downloads, decodes and crops;
- one engine thread runs the model on micro-batches and produces the outcomes.

Invariant: an input offset is committed only after the result or dead letter of that event
and of every earlier event of its partition was acknowledged by the broker (OffsetTracker).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import structlog
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from PIL import Image

from consumer.batching import Item, MicroBatcher
from consumer.config import WorkerSettings
from consumer.errors import EventError
from consumer.kafka_io import consumer_config, producer_config, to_record
from consumer.offsets import OffsetTracker
from consumer.stages import (
    ScoredFace,
    encode_dead_letter,
    encode_result,
    parse_event,
    prepare_event,
)
from consumer.work import FailedEvent, InputRecord, Outcome, PreparedEvent

log = structlog.get_logger("consumer.pipeline")


class Classifier(Protocol):
    """What the pipeline needs of the model engine."""

    model_id: str

    def classify(self, faces: Sequence[Image.Image]) -> Sequence[ScoredFace]: ...


class WorkerStats:
    """Counters for the summary line and tests; written by several threads under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.consumed = 0
        self.results = 0
        self.dead_letters = 0
        self.batches = 0
        self.faces = 0
        self.commits = 0

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


class Worker:
    """Runs until `request_stop()`; `run()` returns the process exit code."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: Classifier,
        *,
        consumer_factory: Callable[[dict[str, Any]], Consumer] = Consumer,
        producer_factory: Callable[[dict[str, Any]], Producer] = Producer,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.stats = WorkerStats()
        self.tracker = OffsetTracker()
        self.batcher = MicroBatcher(
            settings.batch.max_batch_size, settings.batch.max_wait_ms / 1000.0
        )
        self._consumer = consumer_factory(consumer_config(settings.kafka))
        self._producer = producer_factory(producer_config(settings.kafka))
        self._pool = ThreadPoolExecutor(settings.fetch.threads, thread_name_prefix="fetch")
        self._stop = threading.Event()
        self._engine_stop = threading.Event()
        self._fatal: str | None = None
        self._paused = False
        self._last_commit = time.monotonic()
        self._engine_thread = threading.Thread(target=self._engine_loop, name="engine", daemon=True)

    # ---- control -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop taking new events; run() drains what is in flight and returns."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> int:
        kafka = self.settings.kafka
        log.info(
            "worker starting",
            input_topic=kafka.input_topic,
            group_id=kafka.group_id,
            output_topic=kafka.output_topic,
            model_id=self.engine.model_id,
        )
        self._consumer.subscribe(
            [kafka.input_topic],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self._engine_thread.start()
        try:
            while not self._stop.is_set() and self._fatal is None:
                self._poll_once()
            return self._shutdown()
        finally:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- poll loop ----------------------------------------------------------------------

    def _poll_once(self) -> None:
        self._producer.poll(0)  # serve delivery reports -> tracker.mark_done
        self._apply_backpressure()
        messages = self._consumer.consume(200, timeout=self.settings.kafka.poll_timeout_s)
        for message in messages:
            self._handle(message)
        self._maybe_commit()

    def _handle(self, message: Message) -> None:
        error = message.error()
        if error is not None:
            if error.fatal():
                self._fail(f"fatal consumer error: {error}")
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error", error=str(error))
            return
        record = to_record(message)
        self.tracker.track(record.topic_partition, record.offset)
        self.stats.add(consumed=1)
        try:
            event = parse_event(record, self.settings.flow.max_event_bytes)
        except EventError as exc:
            self._publish(
                encode_dead_letter(
                    FailedEvent(record, exc.kind, exc.message),
                    self.settings.kafka.dead_letter_topic,
                )
            )
            return
        future = self._pool.submit(prepare_event, record, event, self.settings.fetch)
        self.batcher.put(future)

    def _apply_backpressure(self) -> None:
        flow = self.settings.flow
        in_flight = self.tracker.in_flight()
        if not self._paused and in_flight >= flow.max_in_flight:
            self._consumer.pause(self._consumer.assignment())
            self._paused = True
            log.debug("paused partitions", in_flight=in_flight)
        elif self._paused and in_flight <= flow.resume_below:
            self._consumer.resume(self._consumer.assignment())
            self._paused = False
            log.debug("resumed partitions", in_flight=in_flight)

    # ---- engine thread ------------------------------------------------------------------

    def _engine_loop(self) -> None:
        try:
            self._engine_batches()
        except Exception as exc:  # a bug here must end the process, not hang it
            log.exception("engine thread crashed")
            self._fail(f"engine thread crashed: {type(exc).__name__}: {exc}")

    def _engine_batches(self) -> None:
        while True:
            batch = self.batcher.next_batch(self._engine_stop)
            if not batch:
                if self._engine_stop.is_set():
                    return
                continue
            for outcome in self._run_batch(batch):
                self._publish(outcome)

    def _run_batch(self, batch: list[Item]) -> list[Outcome]:
        kafka = self.settings.kafka
        prepared = [item for item in batch if isinstance(item, PreparedEvent)]
        crops = [crop for item in prepared for crop in item.crops]
        started = time.perf_counter()
        try:
            scores = list(self.engine.classify(crops)) if crops else []
        except Exception as exc:  # one bad batch becomes dead letters, not a dead worker
            log.exception("model failed on a batch", faces=len(crops))
            scores = []
            batch = [
                FailedEvent(
                    i.record,
                    "model_error",
                    f"{type(exc).__name__}: {exc}",
                    i.fetch_attempts,
                    i.event.event_id,
                )
                if isinstance(i, PreparedEvent)
                else i
                for i in batch
            ]
        log.debug(
            "batch classified",
            events=len(batch),
            faces=len(crops),
            model_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        self.stats.add(batches=1, faces=len(crops))
        outcomes, cursor = [], 0
        for item in batch:
            if isinstance(item, PreparedEvent):
                count = len(item.crops)
                outcomes.append(
                    encode_result(
                        item,
                        scores[cursor : cursor + count],
                        self.engine.model_id,
                        kafka.output_topic,
                    )
                )
                cursor += count
            else:
                outcomes.append(encode_dead_letter(item, kafka.dead_letter_topic))
        return outcomes

    # ---- publishing and committing ------------------------------------------------------

    def _publish(self, outcome: Outcome) -> None:
        record = outcome.record
        with structlog.contextvars.bound_contextvars(
            event_id=outcome.event_id, partition=record.partition, offset=record.offset
        ):
            if outcome.is_dead_letter:
                log.warning("dead letter", topic=record.topic, reason=outcome.reason)
            else:
                log.debug("result published", topic=outcome.topic)

        def delivered(error: KafkaError | None, _message: Message) -> None:
            self._on_delivery(record, outcome.is_dead_letter, error)

        while True:
            try:
                self._producer.produce(
                    outcome.topic,
                    value=outcome.value,
                    key=outcome.key,
                    headers=outcome.headers,
                    on_delivery=delivered,
                )
                return
            except BufferError:
                self._producer.poll(0.05)  # local queue full: let deliveries drain it

    def _on_delivery(self, record: InputRecord, dead: bool, error: KafkaError | None) -> None:
        if error is not None:
            # Never commit past an unacknowledged result: stop, and let the events be
            # redelivered to whoever owns the partition next.
            self._fail(
                f"result for {record.topic}[{record.partition}]@{record.offset} "
                f"was not delivered: {error}"
            )
            return
        self.stats.add(dead_letters=1) if dead else self.stats.add(results=1)
        self.tracker.mark_done(record.topic_partition, record.offset)

    def _maybe_commit(self, force: bool = False) -> None:
        interval = self.settings.kafka.commit_interval_s
        if not force and time.monotonic() - self._last_commit < interval:
            return
        self._last_commit = time.monotonic()
        self._commit(self.tracker.committable())

    def _commit(self, offsets: dict[tuple[str, int], int]) -> None:
        if not offsets or self._fatal is not None:
            return
        partitions = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            self._consumer.commit(offsets=partitions, asynchronous=False)
        except Exception as exc:
            log.warning("commit failed; will retry", error=str(exc))
            return
        self.tracker.mark_committed(offsets)
        self.stats.add(commits=1)

    def _fail(self, reason: str) -> None:
        if self._fatal is None:
            log.error("worker failing", reason=reason)
            self._fatal = reason

    # ---- rebalance callbacks (run inside consume(), on the poll thread) ------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.tracker.assign((tp.topic, tp.partition))
        if self._paused:
            consumer.pause(partitions)
        log.info("partitions assigned", partitions=[tp.partition for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._producer.flush(5.0)  # deliveries that arrive now may still be committed
        owned = {(tp.topic, tp.partition) for tp in partitions}
        self._commit({tp: o for tp, o in self.tracker.committable().items() if tp in owned})
        for tp in owned:
            self.tracker.revoke(tp)
        log.info("partitions revoked", partitions=sorted(p for _, p in owned))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Lost, not revoked: another member may own them already, so commit nothing.
        for tp in partitions:
            self.tracker.revoke((tp.topic, tp.partition))
        log.warning("partitions lost", partitions=[tp.partition for tp in partitions])

    # ---- shutdown -----------------------------------------------------------------------

    def _shutdown(self) -> int:
        deadline = time.monotonic() + self.settings.flow.drain_timeout_s
        self._consumer.pause(self._consumer.assignment())
        while self._fatal is None and self.tracker.in_flight() and time.monotonic() < deadline:
            self._producer.poll(0.05)
            # Keep calling consume (paused: it returns nothing) to stay in the group.
            self._consumer.consume(1, timeout=0)
        self._engine_stop.set()
        self._engine_thread.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        self._producer.flush(max(1.0, deadline - time.monotonic()))
        if self._fatal is None:
            self._maybe_commit(force=True)
        self._consumer.close()
        self._producer.close()
        left = self.tracker.in_flight()
        log.info(
            "worker stopped",
            consumed=self.stats.consumed,
            results=self.stats.results,
            dead_letters=self.stats.dead_letters,
            unfinished=left,
            failure=self._fatal,
        )
        return 1 if self._fatal is not None else 0
