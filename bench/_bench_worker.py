"""The worker rows: the whole, unchanged `Worker` end to end, at the eager engine's best batch.

`worker-memory` (here) runs it on consumer.stream.memory_broker.MemoryBroker, which needs no
JVM and no network, so it runs on a bare GPU host; `worker-kafka`
(bench/_bench_worker_kafka.py) runs it against a real broker. Both publish N frame events
before the worker starts, so it starts on a backlog and its rate is its own, not the
producer's; the rate is taken between the broker timestamps of the first and the last
result (CreateTime, set when the worker's producer wrote them).

The events reference real faces (data/faces, round robin over the classes) served over
HTTP/1.1 from a loopback server in its own process (bench/_image_server.py), so the fetch
path runs as in production: `--worker-images file|data` uses file:// or inline data: URIs
instead. Each result of the first faces is held to what the same engine says when called
directly on the same files, so the agreement columns check the fetch/decode path.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from bench._bench_core import Bench, Row, agreement
from bench._image_server import image_server, url_path
from bench._variants import variant_settings
from consumer.engine import EmotionEngine, FaceScores
from schemas import ClassifiedFace, EmotionResult

# Longer than an engine row's cap: the worker has to get through every published event.
WORKER_CAP_S = 120.0
IMAGE_MODES = ("http", "file", "data")
# Below this share of the engine's rate the row says where the time went.
TARGET_RATIO = 0.97


@dataclass
class Outcomes:
    """What came out: result timestamps (s, sorted), dead letters, and checked results."""

    stamps: list[float] = field(default_factory=list)
    letters: int = 0
    checked: dict[str, Any] = field(default_factory=dict)  # event id -> first face's scores


@dataclass
class Published:
    """The events as sent: (key, value) pairs, and the direct-engine scores of some."""

    records: list[tuple[bytes, bytes]]
    reference: dict[str, FaceScores]


class TimedEngine:
    """The engine as the worker gets it, noting when each classify() ran and on how many
    faces: wall-clock time, to line up with the broker's timestamps. The Worker needs only
    model_id and classify (consumer.stream.batch_runner.Classifier), so it runs unchanged."""

    def __init__(self, engine: EmotionEngine) -> None:
        self.engine = engine
        self.model_id = engine.model_id
        self.calls: list[tuple[float, float, int]] = []

    def classify(self, faces: Sequence[Image.Image]) -> list[FaceScores]:
        started = time.time()
        scores = self.engine.classify(faces)
        self.calls.append((started, time.time(), len(faces)))
        return scores


def eager_engine(bench: Bench, batch: int) -> tuple[TimedEngine, Any, list[str]]:
    """A warmed eager engine at `batch`, its ModelSettings and their notes."""
    model_settings, notes = variant_settings(bench.base_settings, "eager")
    engine = EmotionEngine(bench.checkpoint, model_settings, max_batch_size=batch)
    engine.warm_up()
    return TimedEngine(engine), model_settings, notes


@contextlib.contextmanager
def image_base(bench: Bench, images: str) -> Iterator[str | None]:
    """The image server's base URL for `images="http"` (None for file/data), while open."""
    if images != "http":
        yield None
        return
    with image_server(bench.face_folder) as url:
        yield url


def frame_records(
    bench: Bench, engine: TimedEngine, events: int, images: str, base_url: str | None
) -> Published:
    """`events` frame events cycling over the face files, and the engine's own scores of
    the first ones (those the agreement columns compare)."""
    from consumer.event_source import frame_event, image_files

    folder = bench.face_folder
    files = image_files(folder)
    records: list[tuple[bytes, bytes]] = []
    checked: list[tuple[str, Path]] = []
    for index in range(events):
        path = files[index % len(files)]
        event = frame_event(path, inline=images == "data")
        if base_url is not None:
            event = event.model_copy(update={"image": base_url + url_path(folder, path)})
        records.append((event.stream_id.encode(), event.model_dump_json().encode()))
        if index < len(bench.agree_faces):
            checked.append((event.event_id, path))
    faces = []
    for _event_id, path in checked:
        with Image.open(path) as image:
            faces.append(image.copy())
    scores = engine.engine.classify(faces)  # not a worker call: not timed
    return Published(
        records, {event_id: s for (event_id, _), s in zip(checked, scores, strict=True)}
    )


def settings_overrides(
    model_settings: Any, batch: int, images: str, kafka: dict[str, Any], face_folder: Path
) -> dict[str, Any]:
    """load_settings overrides: the defaults, but this engine's batch, (for http) the
    loopback image server allowed past the SSRF check and (for file) the face folder
    readable: the worker refuses file:// images outside fetch.file_roots, empty by default."""
    overrides: dict[str, Any] = {
        "kafka": kafka,
        "model": model_settings.model_dump(mode="json"),
        "batch": {"max_batch_size": batch},
    }
    if images == "http":
        overrides["fetch"] = {"allow_hosts": ["127.0.0.1"]}
    elif images == "file":
        overrides["fetch"] = {"file_roots": [str(face_folder.resolve())]}
    return overrides


def record_outcome(outcomes: Outcomes, value: bytes, stamp_ms: int, wanted: dict[str, Any]) -> None:
    """Count one result; keep its first face's scores if its event is a checked one."""
    outcomes.stamps.append(stamp_ms / 1000.0)
    if not wanted:
        return
    result = EmotionResult.model_validate_json(value)
    # A face skipped for low quality (faces.min_quality) has no scores to compare.
    if result.event_id in wanted and result.faces and isinstance(result.faces[0], ClassifiedFace):
        outcomes.checked[result.event_id] = result.faces[0]


def memory_worker_row(bench: Bench, batch: int, events: int, images: str) -> Row:
    """Results/s of Worker(settings, engine).run() on the in-memory broker at `batch`."""
    from consumer.config import LogSettings, load_settings
    from consumer.ops.logs import configure_logging
    from consumer.stream.kafka_io import run_topics
    from consumer.stream.memory_broker import MemoryBroker
    from consumer.stream.worker import Worker

    configure_logging(LogSettings(format="console", level="warning"))
    engine, model_settings, notes = eager_engine(bench, batch)
    run_id = uuid.uuid4().hex[:8]
    topics = run_topics("bench", run_id)
    broker = MemoryBroker()
    for name, partitions in (("input_topic", 2), ("output_topic", 2), ("dead_letter_topic", 1)):
        broker.create_topic(topics[name], partitions)
    with image_base(bench, images) as base_url:
        sent = frame_records(bench, engine, events, images, base_url)
        for key, value in sent.records:
            broker.produce(topics["input_topic"], value, key=key)
        kafka = {"bootstrap_servers": broker.address, "group_id": f"bench-{run_id}", **topics}
        overrides = settings_overrides(model_settings, batch, images, kafka, bench.face_folder)
        settings = load_settings(overrides=overrides)
        worker = Worker(
            settings,
            engine,
            consumer_factory=broker.consumer_factory,
            producer_factory=broker.producer_factory,
        )
        thread = threading.Thread(target=worker.run, name="bench-worker", daemon=True)
        thread.start()
        deadline = bench.budget.row_deadline(WORKER_CAP_S)
        try:
            done = _wait(broker, topics, len(sent.records), deadline)
        finally:
            worker.request_stop()
            thread.join(timeout=30)
    outcomes = Outcomes(letters=sum(broker.end_offsets(topics["dead_letter_topic"]).values()))
    for message in broker.records(topics["output_topic"]):
        record_outcome(outcomes, message.value() or b"", message.timestamp()[1], sent.reference)
    outcomes.stamps.sort()
    row = Row(variant="worker-memory", batch=batch)
    head = f"{images} images, in-memory broker"
    finish_row(bench, row, outcomes, sent, (worker.metrics, engine), [head, *notes], done)
    return row


def _wait(broker: Any, topics: dict[str, str], expected: int, deadline: float) -> bool:
    """Until every event has a result or dead letter (True), or the deadline (False)."""
    while time.monotonic() < deadline:
        out = sum(broker.end_offsets(topics["output_topic"]).values())
        if out + sum(broker.end_offsets(topics["dead_letter_topic"]).values()) >= expected:
            return True
        time.sleep(0.02)
    return False


def finish_row(
    bench: Bench,
    row: Row,
    outcomes: Outcomes,
    sent: Published,
    measured: tuple[Any, TimedEngine],
    notes: list[str],
    complete: bool,
) -> None:
    """Rate, ratio to the eager engine, agreement and where the time went, into `row`;
    `measured`: the worker's metrics and the engine it ran."""
    stamps, batch = outcomes.stamps, row.batch or 1
    total = len(sent.records)
    metrics, engine = measured
    span = (stamps[0], stamps[-1]) if len(stamps) > 1 else None
    # The first batch's results all appear at the span's start; only those after it count
    # (one face per event here, so a call's faces are its events' results).
    first_batch = engine.calls[0][2] if engine.calls else 1
    if span is not None and span[1] > span[0] and len(stamps) > first_batch:
        row.images_per_s = (len(stamps) - first_batch) / (span[1] - span[0])
    parts = [f"{len(stamps)}/{total} results, {outcomes.letters} dead letters"]
    if not complete:
        parts.append("stopped waiting at the row's time limit")
    engine_rate = next(
        (r.images_per_s for r in bench.rows if r.variant == "eager" and r.batch == batch), None
    )
    if row.images_per_s and engine_rate:
        row.ratio_to_engine = row.images_per_s / engine_rate
        parts.append(f"{row.ratio_to_engine:.2f}x the eager engine's images/s at batch {batch}")
    else:
        parts.append(f"no eager row at batch {batch} to compare with")
    checked = outcomes.checked
    pairs = [(checked[key], ref) for key, ref in sent.reference.items() if key in checked]
    if pairs:
        mine, ref = zip(*pairs, strict=True)
        row.agreement, row.max_abs_diff = agreement(list(mine), list(ref))
        parts.append(f"agree/max Δ: {len(pairs)} results vs the engine on the same files")
    row.details = time_breakdown(metrics, engine.calls, span, engine_rate)
    parts.append(_diagnosis(row, batch))
    row.note = "; ".join(parts + notes)


def _histogram(histogram: Any) -> tuple[float, float]:
    """(count, sum) of a prometheus_client Histogram."""
    count = total = 0.0
    for family in histogram.collect():
        for sample in family.samples:
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
    return count, total


def time_breakdown(
    metrics: Any,
    calls: list[tuple[float, float, int]],
    span: tuple[float, float] | None,
    engine_rate: float | None,
) -> dict[str, float]:
    """Where the worker's time went: its engine calls (when, how full, how fast) and its
    own Prometheus histograms (queue_wait_seconds, model_seconds, batch_faces)."""
    batches, batch_s = _histogram(metrics.model_time)
    waits, wait_s = _histogram(metrics.queue_wait)
    _, faces_total = _histogram(metrics.batch_faces)
    details = {"batches": batches}
    if batches:
        # model_seconds: the engine thread's whole step (classify + encoding the outcomes)
        details["step_ms_per_batch"] = 1000 * batch_s / batches
        details["faces_per_batch"] = faces_total / batches
    if waits:
        details["queue_wait_ms"] = 1000 * wait_s / waits
    # The first call on the worker's engine thread is slow (per-thread set-up: on CUDA a
    # cuBLAS handle) and its results open the span, so the per-call figures leave it out.
    steady = calls[1:] or calls
    if steady:
        seconds = [end - start for start, end, _ in steady]
        faces = sum(count for _, _, count in steady)
        details["calls"] = len(calls)
        details["first_call_ms"] = 1000 * (calls[0][1] - calls[0][0])
        details["slowest_call_ms"] = 1000 * max(seconds)
        details["faces_per_call"] = faces / len(steady)
        details["model_ms_per_call"] = 1000 * sum(seconds) / len(steady)
        details["model_faces_per_s"] = faces / sum(seconds) if sum(seconds) > 0 else 0.0
        if engine_rate:
            details["model_vs_engine"] = details["model_faces_per_s"] / engine_rate
    if calls and span is not None and span[1] > span[0]:
        # Share of the first-to-last-result span during which classify() ran: the rest is
        # the model waiting (for batches, or for the engine thread's other work).
        first, last = span
        busy = sum(max(0.0, min(end, last) - max(start, first)) for start, end, _ in calls)
        details["model_busy_share"] = busy / (last - first)
        details["span_s"] = last - first
    return details


def _diagnosis(row: Row, batch: int) -> str:
    """One clause: the breakdown, and which loss is the larger: the model idle during the
    span (starved), or the model slower per call inside the worker than alone (contention)."""

    def d(key: str) -> float:
        return row.details.get(key, float("nan"))

    busy, speed = d("model_busy_share"), d("model_vs_engine")
    text = (
        f"model busy {busy:.0%} of the span, at {speed:.2f}x the engine row's speed per "
        f"call ({d('faces_per_call'):.1f} faces/call of {batch}, mean "
        f"{d('model_ms_per_call'):.1f} ms/call, slowest {d('slowest_call_ms'):.0f} ms); "
        "engine-thread step "
        f"{d('step_ms_per_batch'):.1f} ms/batch, queue wait {d('queue_wait_ms'):.0f} ms"
    )
    ratio = row.ratio_to_engine
    if ratio is None or ratio >= TARGET_RATIO or math.isnan(busy + speed):
        return text
    if busy <= speed:
        return f"{text}: mostly the model waiting for input (fetch/decode/batching/publishing)"
    return f"{text}: mostly the model running slower than alone (contention in the process)"
