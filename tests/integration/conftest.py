"""Fixtures for tests against the real broker: events from FER faces and a worker factory."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from consumer.event_source import frame_event, image_files
from tests.conftest import FER_TRAIN
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="session")
def face_paths() -> list[Path]:
    """400 real FER faces, round-robin over the seven classes."""
    return image_files(FER_TRAIN, limit=400)


def event_bytes(path: Path, stream_id: str = "cam-1", **fields: object) -> tuple[bytes, bytes]:
    """(key, value) of a frame event for a local image."""
    event = json.loads(frame_event(path, stream_id).model_dump_json())
    return stream_id.encode(), json.dumps({**event, **fields}).encode()


@pytest.fixture
def start_worker(
    tmp_path: Path, kafka_bootstrap: str, tiny_checkpoint: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """start_worker(input_topic=..., ...) -> a running worker process; all are killed after."""
    started: list[WorkerProcess] = []

    def start(**settings: str) -> WorkerProcess:
        env = {
            "kafka__bootstrap_servers": kafka_bootstrap,
            "kafka__commit_interval_s": "0.2",
            "model__path": str(tiny_checkpoint),
            "log__level": "info",
            **settings,
        }
        worker = WorkerProcess(tmp_path / f"worker-{len(started)}.log", env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.kill()


@pytest.fixture
def junk_files(tmp_path: Path) -> dict[str, Path]:
    """Files that are not images, and a copy of a face, for hostile events."""
    folder = tmp_path / "junk"
    folder.mkdir()
    garbage = folder / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    text = folder / "notes.jpg"
    text.write_text("hello")
    face = folder / "face.png"
    shutil.copy(next(FER_TRAIN.joinpath("happy").glob("*.png")), face)
    return {"garbage": garbage, "text": text, "face": face}
