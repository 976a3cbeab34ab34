"""The `worker-kafka` row: the whole worker end to end against a real Kafka broker.

As `worker-memory` (bench/_bench_worker.py), but through librdkafka and a broker: the one
given with --bootstrap-servers, or the project's local broker (deploy/kafka/local_broker.py),
which needs Java and its jars already cached. Nothing is downloaded here: without cached jars
the row is skipped (`python -m deploy.kafka.local_broker fetch` caches them).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from bench._bench_core import CLEANUPS, Bench, Row
from bench._bench_worker import (
    WORKER_CAP_S,
    Outcomes,
    Published,
    eager_engine,
    finish_row,
    frame_records,
    image_base,
    record_outcome,
    settings_overrides,
)


def broker_unavailable(bootstrap: str | None) -> str | None:
    """Why no Kafka broker can be had here without the network (None: it can)."""
    if bootstrap:
        return None
    if shutil.which("java") is None:
        return "no `java` here for the local broker; pass --bootstrap-servers"
    from deploy.kafka.local_broker import default_cache_dir

    if (default_cache_dir() / "libs" / ".complete").exists():
        return None
    return (
        "local broker jars not cached (`python -m deploy.kafka.local_broker fetch` caches "
        "them); pass --bootstrap-servers"
    )


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


def kafka_worker_row(
    bench: Bench, batch: int, events: int, images: str, bootstrap: str | None
) -> Row:
    """Results/s of Worker(settings, engine).run() against a Kafka broker at `batch`."""
    from consumer.config import LogSettings, load_settings
    from consumer.ops.logs import configure_logging
    from consumer.stream.kafka_io import ensure_topics, run_topics
    from consumer.stream.worker import Worker

    configure_logging(LogSettings(format="console", level="warning"))
    logging.getLogger("librdkafka").setLevel(logging.ERROR)  # "coordinator loading" noise
    engine, model_settings, notes = eager_engine(bench, batch)
    run_id = uuid.uuid4().hex[:8]
    topics = run_topics("bench", run_id)
    with _broker(bootstrap) as servers, image_base(bench, images) as base_url:
        ensure_topics(servers, topics.values(), partitions=2)
        sent = frame_records(bench, engine, events, images, base_url)
        _publish(servers, topics["input_topic"], sent)
        kafka = {"bootstrap_servers": servers, "group_id": f"bench-{run_id}", **topics}
        overrides = settings_overrides(model_settings, batch, images, kafka, bench.face_folder)
        settings = load_settings(overrides=overrides)
        worker = Worker(settings, engine)
        thread = threading.Thread(target=worker.run, name="bench-worker", daemon=True)
        thread.start()
        try:
            outcomes = _collect(servers, topics, sent, bench.budget.row_deadline(WORKER_CAP_S))
        finally:
            worker.request_stop()
            thread.join(timeout=30)
    row = Row(variant="worker-kafka", batch=batch)
    complete = len(outcomes.stamps) + outcomes.letters >= len(sent.records)
    head = f"{images} images, Kafka at {bootstrap or 'a local broker'}"
    finish_row(bench, row, outcomes, sent, (worker.metrics, engine), [head, *notes], complete)
    return row


def _publish(servers: str, topic: str, sent: Published) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": servers, "linger.ms": 10})
    for key, value in sent.records:
        producer.produce(topic, key=key, value=value)
        producer.poll(0)
    if producer.flush(30):
        raise RuntimeError("not every frame event reached the broker")


def _collect(servers: str, topics: dict[str, str], sent: Published, deadline: float) -> Outcomes:
    """Results (CreateTime) and dead letters, until all are in or the deadline."""
    from confluent_kafka import Consumer

    reader: Any = Consumer(
        {
            "bootstrap.servers": servers,
            "group.id": f"bench-reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
        }
    )
    reader.subscribe([topics["output_topic"], topics["dead_letter_topic"]])
    outcomes = Outcomes()
    expected = len(sent.records)
    try:
        while len(outcomes.stamps) + outcomes.letters < expected and time.monotonic() < deadline:
            for message in reader.consume(500, timeout=0.5):
                if message.error() is not None:
                    continue
                if message.topic() == topics["dead_letter_topic"]:
                    outcomes.letters += 1
                else:
                    stamp = message.timestamp()[1]
                    record_outcome(outcomes, message.value() or b"", stamp, sent.reference)
    finally:
        reader.close()
    outcomes.stamps.sort()
    return outcomes
