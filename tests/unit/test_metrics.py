"""emotion_worker_build_info and emotion_worker_faces_total: what they carry, and that faces
are counted by predicted label once the broker acknowledges their result."""

from __future__ import annotations

import dataclasses
import platform
import threading
from collections import Counter
from collections.abc import Sequence
from importlib import metadata

import confluent_kafka
from PIL import Image
from prometheus_client import generate_latest

import consumer
from consumer.decode.pool import InlineDecoder
from consumer.ops.metrics import BUILD_INFO_LABELS, HealthState, WorkerMetrics, build_versions
from consumer.stream.memory_broker import MemoryBroker
from consumer.stream.worker import Worker
from tests.unit.test_publisher import OUTPUT, Setup
from tests.unit.test_worker_in_memory import (
    _all_committed,
    _events,
    _results,
    _Scores,
    _topics,
    _until,
    worker_settings,
)

LABELS = ("happy", "sad", "angry")


def _samples(metrics: WorkerMetrics, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(sample.labels), sample.value)
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    ]


def _faces(metrics: WorkerMetrics) -> Counter[str]:
    return Counter(
        {
            labels["label"]: int(value)
            for labels, value in _samples(metrics, "emotion_worker_faces_total")
        }
    )


def test_build_info_is_one_series_of_the_running_versions() -> None:
    metrics = WorkerMetrics()
    ((labels, value),) = _samples(metrics, "emotion_worker_build_info")
    assert value == 1
    assert tuple(sorted(labels)) == tuple(sorted(BUILD_INFO_LABELS))
    assert labels == build_versions()
    assert labels["version"] == consumer.__version__
    assert labels["python"] == platform.python_version()
    assert labels["torch"] == metadata.version("torch")
    assert labels["transformers"] == metadata.version("transformers")
    assert labels["confluent_kafka"] == metadata.version("confluent-kafka")
    assert labels["librdkafka"] == confluent_kafka.libversion()[0]
    # Exposed as Prometheus scrapes it (a second registry does not share the series).
    text = generate_latest(WorkerMetrics().registry).decode()
    assert f'emotion_worker_build_info{{confluent_kafka="{labels["confluent_kafka"]}",' in text


class CyclingEngine:
    """A Classifier that gives the faces of each batch the labels in turn."""

    model_id = "cycling"

    def classify(self, faces: Sequence[Image.Image]) -> list[_Scores]:
        return [
            _Scores(LABELS[i % len(LABELS)], 0.5, {LABELS[i % len(LABELS)]: 0.5})
            for i in range(len(faces))
        ]


def test_faces_are_counted_by_label_as_results_are_acknowledged() -> None:
    broker = MemoryBroker()
    _topics(broker, 2)
    _events(broker, 24, 2)
    settings = worker_settings()
    health = HealthState(60, 300)
    health.model_ready = True
    worker = Worker(
        settings,
        CyclingEngine(),
        consumer_factory=broker.consumer_factory,
        producer_factory=broker.producer_factory,
        decoder=InlineDecoder(settings.faces, settings.fetch.max_pixels),
        health=health,
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        _until(lambda: _all_committed(broker), what="all offsets committed")
    finally:
        worker.request_stop()
        thread.join(10)
    assert not thread.is_alive()
    # Classified faces carry a label (a face skipped for its quality carries none).
    published = Counter(
        face.label for result in _results(broker) for face in result.faces if hasattr(face, "label")
    )
    assert set(published) == set(LABELS)
    assert _faces(worker.metrics) == published


def test_faces_are_not_counted_before_the_broker_acknowledges() -> None:
    s = Setup()
    s.broker.hold_deliveries(True)
    outcomes = [
        dataclasses.replace(o, face_labels=("sad", "happy", "sad") if o.topic == OUTPUT else ())
        for o in s.outcomes(3, dead=frozenset({1}))
    ]
    s.publisher.publish(outcomes)
    s.publisher.serve(0.05)
    assert _faces(s.metrics) == Counter()
    s.broker.hold_deliveries(False)
    s.publisher.flush(2.0)
    assert _faces(s.metrics) == Counter({"sad": 4, "happy": 2})  # two results, no dead letter
