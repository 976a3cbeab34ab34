"""Frame events for the images of a folder: what `emotion-worker produce` publishes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import KafkaError, Message, Producer

from schemas import FrameEvent

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def image_files(folder: Path, limit: int | None = None) -> list[Path]:
    """Images under `folder`, sorted; with `limit`, taken round-robin over subfolders."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    paths = [
        path
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    return round_robin_by_folder(paths, limit)


def round_robin_by_folder(paths: list[Path], limit: int | None = None) -> list[Path]:
    """`paths` taken one folder at a time in turn, in their given order within a folder.

    Round-robin so a limited sample of a class-per-folder layout covers every class.
    """
    by_dir: dict[Path, list[Path]] = {}
    for path in paths:
        by_dir.setdefault(path.parent, []).append(path)
    picked: list[Path] = []
    queues = [iter(group) for group in by_dir.values()]
    while queues and (limit is None or len(picked) < limit):
        for it in list(queues):
            nxt = next(it, None)
            if nxt is None:
                queues.remove(it)
            elif limit is None or len(picked) < limit:
                picked.append(nxt)
    return picked


def frame_event(path: Path, stream_id: str | None = None) -> FrameEvent:
    """A frame event pointing at a local image file."""
    resolved = path.resolve()
    return FrameEvent(
        event_id=str(uuid.uuid4()),
        stream_id=stream_id or resolved.parent.name,
        captured_at=datetime.now(UTC),
        image=resolved.as_uri(),
    )


def frame_events(
    folder: Path, stream_id: str | None = None, limit: int | None = None
) -> Iterator[tuple[Path, FrameEvent]]:
    for path in image_files(folder, limit):
        yield path, frame_event(path, stream_id)


def publish_folder(
    folder: Path,
    bootstrap_servers: str,
    topic: str,
    stream_id: str | None = None,
    limit: int | None = None,
) -> int:
    """Publish one event per image, keyed by stream id; returns how many were acknowledged."""
    producer = Producer(
        {"bootstrap.servers": bootstrap_servers, "enable.idempotence": True, "linger.ms": 10}
    )
    failures: list[str] = []

    def delivered(error: KafkaError | None, _msg: Message) -> None:
        if error is not None:
            failures.append(str(error))

    count = 0
    for _path, event in frame_events(folder, stream_id, limit):
        producer.produce(
            topic,
            key=event.stream_id.encode(),
            value=event.model_dump_json().encode(),
            on_delivery=delivered,
        )
        producer.poll(0)
        count += 1
    remaining = producer.flush(30)
    if remaining or failures:
        raise RuntimeError(
            f"{remaining + len(failures)} of {count} events were not delivered: {failures[:3]}"
        )
    return count
