"""Prometheus metrics of one worker process, and the state behind its health probes.

Every metric lives in the worker's own CollectorRegistry (not the global one), so several
workers in one test process do not collide. Names follow Prometheus conventions: a
`emotion_worker_` prefix, `_total` for counters, base units (`_seconds`, `_bytes`).
The README's operations section lists them.
"""

from __future__ import annotations

import functools
import json
import platform
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = structlog.get_logger("consumer.ops.metrics")

# Seconds, from a few ms (a warm batch) to minutes (a backlog being worked off).
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_MODEL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class WorkerMetrics:
    """The worker's metrics; updated from the poll, fetch and engine threads."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        p = "emotion_worker_"
        self.events_consumed = Counter(
            p + "events_consumed", "Input records read from Kafka.", registry=r
        )
        self.results_published = Counter(
            p + "results_published",
            "Results acknowledged by the broker, by status (ok, no_face).",
            ["status"],
            registry=r,
        )
        self.dead_letters = Counter(
            p + "dead_letters",
            "Dead letters acknowledged by the broker, by error kind.",
            ["reason"],
            registry=r,
        )
        self.outcomes_dropped = Counter(
            p + "outcomes_dropped",
            "Outcomes not published because their partition was revoked meanwhile "
            "(the partition's new owner processes those events again).",
            registry=r,
        )
        self.fetch_retries = Counter(
            p + "fetch_retries", "Image fetch attempts beyond the first.", registry=r
        )
        self.commits = Counter(
            p + "commits",
            "Offset commits (or transactions), by outcome (ok, failed).",
            ["outcome"],
            registry=r,
        )
        self.decoder_failures = Counter(
            p + "decoder_failures",
            "Decoder processes that crashed or timed out on an image.",
            ["cause"],
            registry=r,
        )
        self.batch_faces = Histogram(
            p + "batch_faces", "Faces per model batch.", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_face_fill_ratio = Histogram(
            p + "batch_face_fill_ratio",
            "Faces per model batch divided by batch.max_batch_size (which caps faces).",
            buckets=_RATIO_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            p + "queue_wait_seconds",
            "From reading an event to the start of the model batch that holds it.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_time = Histogram(
            p + "model_seconds",
            "Model time per batch.",
            buckets=_MODEL_BUCKETS,
            registry=r,
        )
        self.capture_to_publish = Histogram(
            p + "capture_to_publish_seconds",
            "From the event's captured_at to its result being acknowledged.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.kafka_to_publish = Histogram(
            p + "kafka_to_publish_seconds",
            "From the input record's Kafka timestamp to its outcome being acknowledged.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            p + "events_in_flight", "Events read and not yet acknowledged.", registry=r
        )
        self.paused_partitions = Gauge(
            p + "paused_partitions", "Assigned partitions paused by backpressure.", registry=r
        )
        self.assigned_partitions = Gauge(
            p + "assigned_partitions", "Partitions assigned to this worker.", registry=r
        )
        self.consumer_lag = Gauge(
            p + "consumer_lag",
            "Records behind the partition's high watermark (librdkafka statistics).",
            ["topic", "partition"],
            registry=r,
        )
        self.gpu_memory = Gauge(
            p + "gpu_memory_bytes",
            "GPU memory held by tensors on the model's device (0 on CPU).",
            registry=r,
        )
        self.faces = Counter(
            p + "faces",
            "Faces classified, by predicted label (results acknowledged by the broker).",
            ["label"],
            registry=r,
        )
        self.build_info = Gauge(
            p + "build_info",
            "Always 1; the labels are the versions of the worker and of what it runs on.",
            list(BUILD_INFO_LABELS),
            registry=r,
        )
        self.build_info.labels(**build_versions()).set(1)
        self.ready = Gauge(p + "ready", "1 when /readyz answers 200.", registry=r)
        self.up_since = Gauge(
            p + "start_time_seconds", "Unix time the worker process started.", registry=r
        )
        self.up_since.set(time.time())

    def counts(self) -> EventCounts:
        """Events by outcome so far, read from the counters (the one count there is)."""
        return EventCounts(
            consumed=_total(self.events_consumed),
            results=_total(self.results_published),
            dead_letters=_total(self.dead_letters),
            dropped=_total(self.outcomes_dropped),
        )

    def count_faces(self, labels: Iterable[str]) -> None:
        """One published result's faces, by predicted label."""
        for label, count in Tally(labels).items():
            self.faces.labels(label=label).inc(count)

    def set_lag(self, lag: dict[tuple[str, int], int]) -> None:
        self.consumer_lag.clear()  # partitions that left must not linger
        for (topic, partition), value in lag.items():
            self.consumer_lag.labels(topic=topic, partition=str(partition)).set(value)


# emotion_worker_build_info's labels: few and stable (one series per pod and release).
BUILD_INFO_LABELS = ("version", "python", "torch", "transformers", "confluent_kafka", "librdkafka")


@functools.cache
def build_versions() -> dict[str, str]:
    """The versions emotion_worker_build_info carries, read from package metadata (torch
    and transformers are not imported for it); "none" for a package that is missing. The
    worker's own is consumer.__version__, read the same way (ops sits below the package
    root, tests/unit/test_layout.py)."""

    def installed(name: str, missing: str = "none") -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return missing

    try:
        import confluent_kafka

        librdkafka = str(confluent_kafka.libversion()[0])
    except ImportError:
        librdkafka = "none"
    return {
        "version": installed("emotion-worker", "0+unknown"),
        "python": platform.python_version(),
        "torch": installed("torch"),
        "transformers": installed("transformers"),
        "confluent_kafka": installed("confluent-kafka"),
        "librdkafka": librdkafka,
    }


@dataclass(frozen=True)
class EventCounts:
    consumed: int
    results: int
    dead_letters: int
    dropped: int  # outcomes of partitions revoked before they were published


def _total(counter: Counter) -> int:
    """A counter's value summed over its labels."""
    return int(
        sum(
            sample.value
            for family in counter.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
        )
    )


class HealthState:
    """What /readyz and /livez decide on; written by the worker, read by the HTTP server."""

    def __init__(self, loop_stall_s: float, stall_timeout_s: float) -> None:
        self.loop_stall_s = loop_stall_s
        self.stall_timeout_s = stall_timeout_s
        self._lock = threading.Lock()
        self.model_ready = False
        self.subscribed = False
        self.stopping = False
        # Set by the worker while no Kafka broker has been reached yet, or while the
        # cluster cannot be reached: what /readyz then says.
        self.kafka_problem: str | None = None
        self.loop_started: float | None = None
        self.last_loop = time.monotonic()
        self.last_progress = time.monotonic()
        self.lag: dict[tuple[str, int], int] = {}

    def loop_turned(self) -> None:
        self.last_loop = time.monotonic()
        if self.loop_started is None:
            self.loop_started = self.last_loop
            # The stall clock starts with consuming, not with the (slow) model load.
            self.last_progress = self.last_loop

    def progressed(self) -> None:
        """An input offset advanced (an outcome acknowledged, or a commit)."""
        self.last_progress = time.monotonic()

    def set_lag(self, lag: dict[tuple[str, int], int]) -> None:
        with self._lock:
            self.lag = lag

    def total_lag(self) -> int:
        with self._lock:
            return sum(max(0, v) for v in self.lag.values())

    def readiness(self) -> tuple[bool, str]:
        if not self.model_ready:
            return False, "model not loaded and warmed yet"
        if self.stopping:
            return False, "stopping"
        if not self.subscribed:
            return False, "not subscribed to the input topic yet"
        problem = self.kafka_problem
        if problem is not None:
            return False, problem
        return True, "ready"

    def liveness(self) -> tuple[bool, str]:
        now = time.monotonic()
        if self.loop_started is not None and now - self.last_loop > self.loop_stall_s:
            return False, f"poll loop has not turned for {now - self.last_loop:.0f}s"
        lag = self.total_lag()
        stuck = now - self.last_progress
        if lag > 0 and stuck > self.stall_timeout_s:
            return False, f"lag {lag} but no offset advanced for {stuck:.0f}s"
        return True, "alive"


def lag_from_statistics(stats_json: str) -> dict[tuple[str, int], int]:
    """Consumer lag per assigned partition from a librdkafka statistics JSON document.

    librdkafka's own consumer_lag is -1 until the group has committed an offset, which
    would hide a worker stuck from its very first batch; so the lag is computed here: the
    end (last stable offset, for read_committed) minus the committed offset, or minus the
    log start when nothing is committed yet (auto.offset.reset=earliest).
    """
    stats: dict[str, Any] = json.loads(stats_json)
    lag: dict[tuple[str, int], int] = {}
    for topic, info in stats.get("topics", {}).items():
        for key, part in info.get("partitions", {}).items():
            partition = int(key)
            # -1 is librdkafka's internal UA partition; "none" is not fetched by us.
            if partition < 0 or part.get("fetch_state") in (None, "none", "stopped"):
                continue
            end = int(part.get("ls_offset", -1))
            if end < 0:
                end = int(part.get("hi_offset", -1))
            base = int(part.get("committed_offset", -1))
            if base < 0:
                base = int(part.get("lo_offset", -1))
            if end >= 0 and base >= 0:
                lag[(topic, partition)] = max(0, end - base)
    return lag


def gpu_memory_bytes() -> int:
    """Bytes held by tensors on the current CUDA device; 0 without CUDA (or before use)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return 0
    return int(torch.cuda.memory_allocated())
