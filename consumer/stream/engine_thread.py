"""The engine thread: micro-batches from the batcher, through the model, to the publisher.

One thread, so batches reach the model and their outcomes reach the publisher in input
order (the exactly_once commit relies on it). It ends when asked and the batcher is empty;
a crash in it fails the worker rather than leaving a loop that reads and never publishes.
"""

from __future__ import annotations

import threading
import time

import structlog

from consumer.ops.metrics import WorkerMetrics
from consumer.stream.batch_runner import BatchRunner
from consumer.stream.batching import MicroBatcher, face_count
from consumer.stream.failure import Failure
from consumer.stream.publisher import Publisher
from consumer.stream.records import Item

log = structlog.get_logger("consumer.stream.engine_thread")


class EngineThread:
    def __init__(
        self,
        batcher: MicroBatcher,
        runner: BatchRunner,
        publisher: Publisher,
        metrics: WorkerMetrics,
        failure: Failure,
        max_batch_faces: int,
    ) -> None:
        self._batcher = batcher
        self._runner = runner
        self._publisher = publisher
        self._metrics = metrics
        self._failure = failure
        self._max_batch_faces = max_batch_faces
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self, timeout_s: float) -> None:
        """Run what the batcher still holds, then end (waiting at most `timeout_s`)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        try:
            while True:
                batch = self._batcher.next_batch(self._stop)
                if not batch:
                    if self._stop.is_set():
                        return
                    continue
                self._run_batch(batch)
        except Exception as exc:  # a bug here must end the process, not hang it
            log.exception("engine thread crashed")
            self._failure.fail(f"engine thread crashed: {type(exc).__name__}: {exc}")

    def _run_batch(self, batch: list[Item]) -> None:
        metrics = self._metrics
        started = time.monotonic()
        for item in batch:
            metrics.queue_wait.observe(started - item.record.read_at)
        outcomes = self._runner.run(batch)
        faces = sum(face_count(i) for i in batch)
        metrics.model_time.observe(time.monotonic() - started)
        metrics.batch_faces.observe(faces)
        metrics.batch_face_fill_ratio.observe(faces / self._max_batch_faces)
        self._publisher.publish(outcomes)
