"""The `worker` row: the whole worker end to end against a Kafka broker.

Frame events for N real faces are published to a fresh topic first, so the worker starts on
a backlog and its rate is its own, not the producer's. The rate is taken between the broker
timestamps (CreateTime, set when the worker produced them) of the first and last result.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from bench._bench_core import CLEANUPS, Bench, Row, variant_settings
from consumer.engine import EmotionEngine

# Longer than an engine row's cap: the worker has to get through every published event.
WORKER_CAP_S = 120.0


def broker_unavailable(bootstrap: str | None) -> str | None:
    """Why no local broker can be started here (None: it can, or one was given)."""
    if bootstrap:
        return None
    if shutil.which("java") is None:
        return "no `java` here for the local broker; pass --bootstrap-servers"
    from deploy.kafka.local_broker import default_cache_dir

    if (default_cache_dir() / "libs" / ".complete").exists():
        return None
    if not shutil.which("mvn"):
        return "broker jars not cached and no `mvn` to fetch them; pass --bootstrap-servers"
    try:  # Maven would otherwise spend the budget on retries against an unreachable mirror
        socket.create_connection(("repo.maven.apache.org", 443), timeout=3).close()
    except OSError:
        return "broker jars not cached and Maven Central unreachable; pass --bootstrap-servers"
    return None


@contextlib.contextmanager
def _broker(bootstrap: str | None) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    from deploy.kafka.local_broker import LocalKafkaBroker

    broker = LocalKafkaBroker()
    # The watchdog's hard exit must not leave the Java broker (own session) running.
    stop = functools.partial(broker.stop, timeout_s=5)
    CLEANUPS.append(stop)
    print("  starting a local Kafka broker ...", flush=True)
    try:
        yield broker.start(timeout_s=90)
    finally:
        CLEANUPS.remove(stop)
        broker.stop()


def worker_row(bench: Bench, batch: int, events: int, bootstrap: str | None) -> Row:
    """Events/s of Worker(settings, engine).run() with eager settings at `batch`."""
    from consumer.config import LogSettings, load_settings
    from consumer.ops.logs import configure_logging
    from consumer.stream.kafka_io import ensure_topics, run_topics
    from consumer.stream.worker import Worker

    configure_logging(LogSettings(format="console", level="warning"))
    logging.getLogger("librdkafka").setLevel(logging.ERROR)  # "coordinator loading" noise
    model_settings, notes = variant_settings(bench.base_settings, "eager")
    engine = EmotionEngine(bench.checkpoint, model_settings, max_batch_size=batch)
    engine.warm_up()
    run_id = uuid.uuid4().hex[:8]
    topics = run_topics("bench", run_id)
    with _broker(bootstrap) as servers:
        ensure_topics(servers, topics.values(), partitions=2)
        sent = _publish(servers, topics["input_topic"], bench, events)
        settings = load_settings(
            overrides={
                "kafka": {"bootstrap_servers": servers, "group_id": f"bench-{run_id}", **topics},
                "model": model_settings.model_dump(mode="json"),
                "batch": {"max_batch_size": batch},
            }
        )
        worker = Worker(settings, engine)
        thread = threading.Thread(target=worker.run, name="bench-worker", daemon=True)
        thread.start()
        try:
            stamps, letters = _collect(
                servers, topics, sent, bench.budget.row_deadline(WORKER_CAP_S)
            )
        finally:
            worker.request_stop()
            thread.join(timeout=30)
    row = Row(variant="worker", batch=batch)
    if len(stamps) > 1:
        row.images_per_s = (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)
    parts = [f"{len(stamps)}/{sent} results, {letters} dead letters; events/s first->last result"]
    if len(stamps) + letters < sent:
        parts.append("stopped waiting at the row's time limit")
    engine_rate = next(
        (r.images_per_s for r in bench.rows if r.variant == "eager" and r.batch == batch), None
    )
    if row.images_per_s and engine_rate:
        row.ratio_to_engine = row.images_per_s / engine_rate
        parts.append(f"{row.ratio_to_engine:.2f}x the eager engine's images/s at batch {batch}")
    row.note = "; ".join(parts + notes)
    return row


def _publish(servers: str, topic: str, bench: Bench, events: int) -> int:
    from confluent_kafka import Producer

    from consumer.event_source import frame_events

    producer = Producer({"bootstrap.servers": servers, "linger.ms": 10})
    count = 0
    for _path, event in frame_events(bench.face_folder, limit=events):
        producer.produce(topic, key=event.stream_id.encode(), value=event.model_dump_json())
        producer.poll(0)
        count += 1
    if producer.flush(30):
        raise RuntimeError("not every frame event reached the broker")
    return count


def _collect(
    servers: str, topics: dict[str, str], expected: int, deadline: float
) -> tuple[list[float], int]:
    """Sorted CreateTime seconds of the results, and the dead-letter count."""
    from confluent_kafka import Consumer

    reader: Any = Consumer(
        {
            "bootstrap.servers": servers,
            "group.id": f"bench-reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
        }
    )
    reader.subscribe([topics["output_topic"], topics["dead_letter_topic"]])
    stamps: list[float] = []
    letters = 0
    try:
        while len(stamps) + letters < expected and time.monotonic() < deadline:
            for message in reader.consume(500, timeout=0.5):
                if message.error() is not None:
                    continue
                if message.topic() == topics["dead_letter_topic"]:
                    letters += 1
                else:
                    stamps.append(message.timestamp()[1] / 1000.0)
    finally:
        reader.close()
    return sorted(stamps), letters
