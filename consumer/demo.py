"""The demo: local broker, the shipped FER model, real FER faces in, emotion results out."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from confluent_kafka import Consumer, Producer

from consumer.config import LogSettings, load_settings
from consumer.event_source import frame_event, image_files, round_robin_by_folder
from consumer.ops.logs import configure_logging
from consumer.stream.kafka_io import CLIENT_LOGGER, ensure_topics, run_topics, to_record
from schemas import ClassifiedFace, DeadLetter, EmotionResult, SkippedFace, WindowSummary

REPO = Path(__file__).resolve().parent.parent
# 404 FER-2013 faces committed with the repository: a stratified sample of the shipped
# model's validation split (data/faces/README.md says where they come from).
DEFAULT_DATA = REPO / "data" / "faces"
# The small LLaVA trained on FER-2013 by `emotion-worker train` (see its README.md).
DEFAULT_MODEL = REPO / "models" / "llava-fer-small"


@contextlib.contextmanager
def _broker(bootstrap_servers: str | None) -> Iterator[str]:
    if bootstrap_servers:
        yield bootstrap_servers
        return
    from deploy.kafka.local_broker import LocalKafkaBroker

    print("starting a local Kafka broker (first run fetches it with Maven) ...", flush=True)
    with LocalKafkaBroker() as broker:
        yield broker.bootstrap_servers


def held_out_faces(data: Path, model: Path, events: int) -> list[Path] | None:
    """Up to `events` faces of the model's validation split, round robin over the classes.

    A model trained by `emotion-worker train` lists the images it never trained on in
    split.json; sending those keeps the demo's share of correct labels honest. `data` may
    hold the whole training folder or only part of the split (the committed sample). None
    when the model has no split file or `data` holds none of its validation faces.
    """
    try:
        split = json.loads((model / "split.json").read_text(encoding="utf-8"))
        relative = [str(item) for item in split["val"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    paths = [data / item for item in relative if (data / item).is_file()]
    if not paths:
        return None
    # Sorted by class folder, so the classes take turns in a fixed order.
    return round_robin_by_folder(sorted(paths, key=lambda path: path.parent.name), events)


def _publish(bootstrap: str, topic: str, faces: list[Path]) -> dict[str, str]:
    """Publish one event per face; returns event id -> true label (the image's folder name)."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "logger": CLIENT_LOGGER}
    )
    truth: dict[str, str] = {}
    for path in faces:
        event = frame_event(path)
        truth[event.event_id] = path.parent.name
        producer.produce(topic, key=event.stream_id.encode(), value=event.model_dump_json())
        producer.poll(0)
    if producer.flush(30):
        raise RuntimeError("the demo's frame events were not all delivered")
    producer.close()
    return truth


def _collect(
    bootstrap: str, topics: list[str], expected: int, timeout_s: float
) -> tuple[list[EmotionResult], list[DeadLetter]]:
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"demo-reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    reader.subscribe(topics)
    results: list[EmotionResult] = []
    letters: list[DeadLetter] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(letters) < expected and time.monotonic() < deadline:
            for msg in reader.consume(500, timeout=0.5):
                if msg.error() or msg.value() is None:
                    continue
                if msg.topic() == topics[0]:
                    results.append(EmotionResult.model_validate_json(msg.value() or b""))
                else:
                    record = to_record(msg)
                    letters.append(DeadLetter.from_record(record.key, record.value, record.headers))
    finally:
        reader.close()
    return results, letters


def _print_report(
    results: list[EmotionResult],
    letters: list[DeadLetter],
    truth: dict[str, str],
    elapsed: float,
    sent: int,
    note: str,
) -> None:
    print(
        f"\n{'partition':>9} {'offset':>6}  {'true':<10} {'predicted':<10} {'conf':>5} "
        f"{'quality':>7}  scores"
    )
    shown = sorted(results, key=lambda r: (r.source.offset, r.source.partition))[:12]
    for result in shown:
        where = f"{result.source.partition:>9} {result.source.offset:>6}  "
        true = f"{truth.get(result.event_id, '?'):<10} "
        face = result.faces[0] if result.faces else None
        if isinstance(face, ClassifiedFace):
            top = sorted(face.scores.items(), key=lambda kv: -kv[1])[:3]
            print(
                f"{where}{true}{face.label:<10} {face.confidence:>5.2f} "
                f"{face.quality.score:>7.2f}  "
                + " ".join(f"{label}={score:.2f}" for label, score in top)
            )
        elif face is not None:  # skipped under faces.min_quality
            print(f"{where}{true}{'(skipped)':<16} {face.quality.score:>7.2f}  {face.reason}")
        else:
            print(f"{where}{true}({result.status})")
    faces = [
        (r.event_id, f.label) for r in results for f in r.faces if isinstance(f, ClassifiedFace)
    ]
    skipped = sum(isinstance(f, SkippedFace) for r in results for f in r.faces)
    correct = sum(1 for event_id, label in faces if truth.get(event_id) == label)
    unique = len({(r.source.partition, r.source.offset) for r in results})
    share = 100.0 * correct / max(1, len(faces))
    also = f"; {skipped} more skipped for low quality" if skipped else ""
    print(
        f"\ncorrect labels: {correct}/{len(faces)} faces ({share:.1f}%; chance is 14%; "
        f"{note}{also})"
    )
    print(
        f"summary: events={sent} results={len(results)} (unique {unique}) "
        f"dead_letters={len(letters)} elapsed={elapsed:.1f}s "
        f"events/s={(len(results) + len(letters)) / max(elapsed, 1e-9):.1f}"
    )


def _summaries(bootstrap: str, topic: str, results: int, timeout_s: float) -> list[WindowSummary]:
    """The window summaries on `topic`, read until they count `results` results (every
    window closed) or the timeout; the latest record of each window."""
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"demo-reader-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    reader.subscribe([topic])
    windows: dict[tuple[str, str], WindowSummary] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while sum(w.results for w in windows.values()) < results and time.monotonic() < deadline:
            for msg in reader.consume(500, timeout=0.5):
                if msg.error() is None and msg.value():
                    window = WindowSummary.model_validate_json(msg.value() or b"")
                    windows[(window.stream_id, window.window_start.isoformat())] = window
    finally:
        reader.close()
    return sorted(windows.values(), key=lambda w: (w.stream_id, w.window_start))


def _print_summaries(windows: list[WindowSummary]) -> None:
    """Per stream (the demo's streams are the faces' classes): windows, faces, top label."""
    print(f"\n{'stream':<10} {'windows':>7} {'faces':>5}  {'top label':<10} {'mean conf':>9}")
    for stream in sorted({w.stream_id for w in windows}):
        mine = [w for w in windows if w.stream_id == stream]
        per_label: dict[str, int] = {}
        for window in mine:
            for label, summary in window.labels.items():
                per_label[label] = per_label.get(label, 0) + summary.faces
        top = max(per_label, key=lambda label: per_label[label]) if per_label else "-"
        confidences = [w.mean_confidence for w in mine if w.mean_confidence is not None]
        mean = sum(confidences) / len(confidences) if confidences else 0.0
        faces = sum(w.faces for w in mine)
        print(f"{stream:<10} {len(mine):>7} {faces:>5}  {top:<10} {mean:>9.2f}")


def run_demo(
    data: Path | None = None,
    events: int = 300,
    model_path: Path | None = None,
    bootstrap_servers: str | None = None,
    timeout_s: float = 240.0,
    keep_open: bool = False,
) -> int:
    """Run the whole path once; returns 0 when every event got a result or dead letter
    and every result was counted in a window summary. With `keep_open` the live page
    stays up until Ctrl-C."""
    from consumer.dashboard.app import start_dashboard
    from consumer.engine import EmotionEngine, make_tiny_checkpoint
    from consumer.stream.worker import Worker
    from consumer.summarize.loop import Summarizer

    data = data or DEFAULT_DATA
    if not data.is_dir():
        print(
            f"error: face folder {data} does not exist; pass --data FOLDER "
            "(one subfolder per emotion, like FER-2013's train folder), or restore the "
            "committed faces with `git checkout -- data/faces`"
        )
        return 2
    model = model_path or DEFAULT_MODEL
    if not (model / "config.json").exists():
        if model_path is None:
            print(f"error: the shipped model {model} is missing; restore it with git checkout")
            return 2
        print(f"writing a tiny random LLaVA checkpoint to {model} ...", flush=True)
        make_tiny_checkpoint(model)
    faces = held_out_faces(data, model, events)
    if faces is not None:
        note = "faces from the model's validation split, which it never trained on"
    else:
        faces = image_files(data, limit=events)
        note = f"faces from {data}, which the model may have trained on"
    configure_logging(LogSettings(format="console", level="warning"))
    # A fresh broker answers "coordinator load in progress" for a moment; not worth showing.
    logging.getLogger("librdkafka").setLevel(logging.ERROR)
    run_id = uuid.uuid4().hex[:8]
    topics = run_topics("demo", run_id)
    with _broker(bootstrap_servers) as bootstrap:
        ensure_topics(bootstrap, topics.values(), partitions=2)
        settings = load_settings(
            overrides={
                "kafka": {"bootstrap_servers": bootstrap, "group_id": f"demo-{run_id}", **topics},
                "model": {"path": str(model)},
                # The events name the faces by file:// path: the one folder they lie in
                # is readable, as the worker refuses file:// images by default.
                "fetch": {"file_roots": [str(data.resolve())]},
                # The demo's events all arrive within seconds: close a stream's windows a
                # few seconds after it falls silent, not the default 30.
                "summarize": {
                    "summaries_topic": f"demo-summaries-{run_id}",
                    "group_id": f"demo-summarizer-{run_id}",
                    "grace_s": 1,
                    "idle_close_s": 3,
                },
                "dashboard": {"port": 0},  # any free port on 127.0.0.1
            }
        )
        engine = EmotionEngine.load(settings.model, max_batch_size=settings.batch.max_batch_size)
        engine.warm_up()
        truth = _publish(bootstrap, topics["input_topic"], faces)
        print(
            f"published {len(truth)} frame events from {data}; running the worker ...", flush=True
        )
        # Created here, not by the summarizer's thread: the page reads it from the start.
        ensure_topics(bootstrap, [settings.summarize.summaries_topic], partitions=2)
        summarizer = Summarizer(settings)
        summarizing = threading.Thread(target=summarizer.run, name="summarizer", daemon=True)
        summarizing.start()
        dashboard = start_dashboard(settings)
        print(f"live page of the window summaries: {dashboard.url}", flush=True)
        worker = Worker(settings, engine)
        exit_codes: list[int] = []
        thread = threading.Thread(target=lambda: exit_codes.append(worker.run()), name="worker")
        started = time.monotonic()
        thread.start()
        results, letters = _collect(
            bootstrap, [topics["output_topic"], topics["dead_letter_topic"]], len(truth), timeout_s
        )
        elapsed = time.monotonic() - started
        worker.request_stop()
        thread.join()
        unique = len({r.result_id for r in results})
        windows = _summaries(bootstrap, settings.summarize.summaries_topic, unique, 60.0)
        _print_report(results, letters, truth, elapsed, len(truth), note)
        _print_summaries(windows)
        summarized = sum(w.results for w in windows)
        print(f"window summaries: {len(windows)} windows counting {summarized} results")
        if keep_open:
            print(f"the live page stays up at {dashboard.url}; Ctrl-C to stop", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1)
        dashboard.stop()
        summarizer.request_stop()
        summarizing.join(30)
    complete = unique + len(letters) >= len(truth)
    return 0 if complete and summarized == unique and exit_codes == [0] else 1
