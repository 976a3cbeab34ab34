"""Metrics scraped from a running worker, and its probes flipping as the issue describes."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.events import event_bytes
from tests.support.kafka import produce, read
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.kafka


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def health_url(worker: WorkerProcess) -> str:
    entry = worker.wait_for_event(
        lambda e: e.get("event") == "health server listening", "the health server's port"
    )
    return f"http://127.0.0.1:{entry['port']}"


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text exposition."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name + (f"{{{wanted}}}" if labels else "")) + r" (\S+)"
    match = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    assert match, f"no sample {name}{labels} in:\n{text}"
    return float(match.group(1))


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_metrics_count_what_the_worker_did(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_worker: Callable[..., WorkerProcess],
    face_paths: list[Path],
) -> None:
    frames, out, dead = (topic_factory(n, 1) for n in ("frames", "emotions", "dead"))
    good = [event_bytes(p) for p in face_paths[:30]]
    # Missing, in a folder the worker may read (fetch.file_roots): image_not_found.
    missing = event_bytes(face_paths[0], image=(face_paths[0].parent / "no-such.png").as_uri())
    poison = [(b"k", b"{not json"), (b"k", b"\xff"), missing]
    produce(kafka_bootstrap, frames, good + poison)
    worker = start_worker(
        kafka__input_topic=frames,
        kafka__output_topic=out,
        kafka__dead_letter_topic=dead,
        kafka__group_id=f"group-{frames}",
        health__statistics_interval_s="0.5",
        fetch__retries="0",
    )
    url = health_url(worker)
    read(kafka_bootstrap, out, expected=30, timeout_s=120)
    read(kafka_bootstrap, dead, expected=3, timeout_s=60)
    wait_for(lambda: get(url + "/readyz")[0] == 200, "readiness")

    def scraped() -> str:
        return get(url + "/metrics")[1]

    # Delivery reports and the lag statistics arrive on their own schedule.
    wait_for(
        lambda: (
            "emotion_worker_consumer_lag{" in scraped()
            and sample(scraped(), "emotion_worker_consumer_lag", partition="0", topic=frames) == 0
        ),
        "consumer lag 0 after the commit",
    )
    text = scraped()
    assert sample(text, "emotion_worker_events_consumed_total") == 33
    assert sample(text, "emotion_worker_results_published_total", status="ok") == 30
    assert sample(text, "emotion_worker_dead_letters_total", reason="not_json") == 2
    assert sample(text, "emotion_worker_dead_letters_total", reason="image_not_found") == 1
    assert sample(text, "emotion_worker_batch_faces_sum") == 30
    batches = sample(text, "emotion_worker_batch_faces_count")
    assert batches >= 1
    assert sample(text, "emotion_worker_model_seconds_count") == batches
    assert "emotion_worker_batch_fill_ratio" not in text  # removed in 0.4.0
    # Faces over the cap on faces (batch.max_batch_size, 16 by default): 30 faces in all.
    assert sample(text, "emotion_worker_batch_face_fill_ratio_count") == batches
    assert sample(text, "emotion_worker_batch_face_fill_ratio_sum") == pytest.approx(30 / 16)
    assert sample(text, "emotion_worker_queue_wait_seconds_count") >= 31  # all but not_json
    assert sample(text, "emotion_worker_capture_to_publish_seconds_count") == 30
    assert sample(text, "emotion_worker_kafka_to_publish_seconds_count") == 33
    assert sample(text, "emotion_worker_commits_total", outcome="ok") >= 1
    assert sample(text, "emotion_worker_events_in_flight") == 0
    assert sample(text, "emotion_worker_assigned_partitions") == 1
    assert sample(text, "emotion_worker_gpu_memory_bytes") == 0  # CPU
    assert get(url + "/livez")[0] == 200
    assert worker.stop() == 0, worker.log_text()[-3000:]
    # Dead-letter lines carry the event's coordinates (and stream, once it was parsed).
    letters = {
        str(e["reason"]).split(":")[0]: e
        for e in worker.log_events()
        if e.get("event") == "dead letter"
    }
    missing_line = letters["image_not_found"]
    assert missing_line["stream_id"] == "cam-1" and missing_line["partition"] == 0
    assert isinstance(missing_line["offset"], int) and missing_line["event_id"]
    assert letters["not_json"]["stream_id"] is None


def test_a_stuck_worker_stops_being_live(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_worker: Callable[..., WorkerProcess],
    face_paths: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frames = topic_factory("frames", 1)
    produce(kafka_bootstrap, frames, [event_bytes(p) for p in face_paths[:10]])
    monkeypatch.setenv("FAULT_BATCH_DELAY_S", "60")
    # The model step hangs (60 s per batch): the poll loop keeps turning, but no offset
    # advances while there is lag. That worker must fail /livez to be restarted.
    worker = start_worker(
        module="tests.faults.slow_worker",
        kafka__input_topic=frames,
        kafka__output_topic=topic_factory("emotions", 1),
        kafka__dead_letter_topic=topic_factory("dead", 1),
        kafka__group_id=f"group-{frames}",
        health__statistics_interval_s="0.5",
        health__stall_timeout_s="4",
    )
    url = health_url(worker)
    wait_for(lambda: get(url + "/readyz")[0] == 200, "readiness")
    assert get(url + "/livez")[0] == 200
    wait_for(lambda: get(url + "/livez")[0] == 503, "liveness to fail", timeout_s=60)
    code, body = get(url + "/livez")
    assert code == 503 and "lag 10 but no offset advanced" in body, body
    assert get(url + "/readyz")[0] == 200  # ready and not live: Kubernetes restarts it
    worker.kill()
