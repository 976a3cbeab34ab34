"""Shared fixtures: the tiny LLaVA checkpoint, FER faces, and the Kafka broker."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.worker import WorkerProcess

REPO = Path(__file__).resolve().parent.parent
# 404 FER-2013 faces committed with the repository (data/faces/README.md): a stratified
# sample of the shipped model's validation split, which it never trained on.
FER_FACES = REPO / "data" / "faces"
# The committed FER-trained LLaVA (emotion-worker train) and its eval report on its own
# validation split; tests that need meaningful scores use it, fast unit tests the tiny one.
FER_CHECKPOINT = REPO / "models" / "llava-fer-small"
FER_REPORT = REPO / "models" / "reports" / "llava-fer-small-val"


@pytest.fixture(autouse=True)
def _keep_logging_config() -> Iterator[None]:
    """Put structlog's and the root logger's set-up back after each test.

    A test that runs the CLI in this process (main(["run", ...])) points both at pytest's
    captured stderr of that test, which is closed afterwards: a later test's worker thread
    logging there would die of "I/O operation on closed file".
    """
    import logging

    import structlog

    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny LLaVA written in the Hugging Face layout."""
    from consumer.engine import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llava", seed=0)


@pytest.fixture(scope="session")
def fer_faces() -> list[tuple[Path, str]]:
    """Two real FER faces per class: (path, true label)."""
    picked = []
    for class_dir in sorted(p for p in FER_FACES.iterdir() if p.is_dir()):
        for image in sorted(class_dir.glob("*.png"))[:2]:
            picked.append((image, class_dir.name))
    return picked


def _docker_engine_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A real broker: $KAFKA_BOOTSTRAP_SERVERS, else testcontainers, else the local launcher."""
    named = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if named:
        yield named
        return
    if _docker_engine_answers():
        from testcontainers.community.kafka import KafkaContainer

        with KafkaContainer().with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    from deploy.kafka.local_broker import LocalKafkaBroker

    with LocalKafkaBroker() as broker:
        yield broker.bootstrap_servers


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> Callable[..., str]:
    """Creates a fresh topic with a unique name: topic_factory("frames", partitions=2)."""
    from consumer.stream.kafka_io import ensure_topics

    def make(prefix: str, partitions: int = 1) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        ensure_topics(kafka_bootstrap, [name], partitions=partitions)
        return name

    return make


@pytest.fixture(scope="session")
def face_paths() -> list[Path]:
    """400 real FER faces, round-robin over the seven classes."""
    from consumer.event_source import image_files

    return image_files(FER_FACES, limit=400)


@pytest.fixture
def start_worker(
    tmp_path: Path, kafka_bootstrap: str, tiny_checkpoint: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """start_worker(input_topic=..., ...) -> a running worker process; all are killed after."""
    started: list[WorkerProcess] = []

    def start(module: str = "consumer.cli", **settings: str) -> WorkerProcess:
        env = {
            "kafka__bootstrap_servers": kafka_bootstrap,
            "kafka__commit_interval_s": "0.2",
            "model__path": str(tiny_checkpoint),
            "log__level": "info",
            # Image servers under test listen on loopback, which the SSRF guard refuses
            # by default; a test may still override this.
            "fetch__allow_hosts": '["127.0.0.1"]',
            # file:// images: the committed faces and this test's own files only.
            "fetch__file_roots": json.dumps([str(REPO / "data"), str(tmp_path.resolve())]),
            # Several workers run at once: each takes a free port for its health server.
            "health__host": "127.0.0.1",
            "health__port": "0",
            **settings,
        }
        worker = WorkerProcess(tmp_path / f"worker-{len(started)}.log", env, module)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.kill()
