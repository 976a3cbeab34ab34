"""Frame events for the images of a folder: what `emotion-worker produce` publishes."""

from __future__ import annotations

import base64
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from consumer.config import WorkerSettings
from consumer.stream.client_errors import ErrorKind, classify
from schemas import FrameEvent
from schemas.events import MAX_DATA_URI_CHARS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}
# The media type written into an inline image's data: URI (the worker decodes by content).
_MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
}
# librdkafka repeats a refused connection every backoff; its errors reach error_cb and the
# final message instead of flooding the terminal.
_QUIET_CLIENT_LOG = logging.getLogger("consumer.event_source.librdkafka")
_QUIET_CLIENT_LOG.addHandler(logging.NullHandler())
_QUIET_CLIENT_LOG.propagate = False


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


def data_uri(path: Path) -> str:
    """The image file as a data:<type>;base64,<bytes> URI (what the worker's data: reader takes)."""
    media_type = _MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{media_type};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def frame_event(path: Path, stream_id: str | None = None, inline: bool = False) -> FrameEvent:
    """A frame event for a local image: its file:// URI, or with `inline` the image itself."""
    resolved = path.resolve()
    return FrameEvent(
        event_id=str(uuid.uuid4()),
        stream_id=stream_id or resolved.parent.name,
        captured_at=datetime.now(UTC),
        image=data_uri(resolved) if inline else resolved.as_uri(),
    )


def frame_events(
    folder: Path, stream_id: str | None = None, limit: int | None = None
) -> Iterator[tuple[Path, FrameEvent]]:
    for path in image_files(folder, limit):
        yield path, frame_event(path, stream_id)


class PublishError(RuntimeError):
    """The cluster cannot be reached or refuses this client; nothing more can be published."""


@dataclass
class PublishReport:
    """What `publish_folder` did: acknowledged, failed (with the errors) and skipped events."""

    topic: str
    published: int = 0
    failed: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"published {self.published} frame events to {self.topic} "
            f"({self.failed} failed, {self.skipped} skipped)"
        )


def inline_problem(path: Path, event: FrameEvent, settings: WorkerSettings) -> str | None:
    """Why the worker would dead-letter this inline event instead of classifying it, if so."""
    size = len(event.model_dump_json().encode())
    payload = event.image.partition(",")[2]
    # The worker's own checks: the event size first, then the data: cap (before decoding,
    # 4 base64 characters carry 3 bytes), see stream.stages.parse_event and
    # fetch.references.fetch_bytes.
    data_cap = min(settings.fetch.max_data_uri_bytes, settings.fetch.max_bytes)
    reasons = []
    if size > settings.flow.max_event_bytes:
        reasons.append(
            f"event is {size} bytes, over flow.max_event_bytes={settings.flow.max_event_bytes}"
        )
    if (data_bytes := len(payload) // 4 * 3) > data_cap:
        reasons.append(
            f"image data is {data_bytes} bytes, over the data: URI cap {data_cap} "
            "(fetch.max_data_uri_bytes, fetch.max_bytes)"
        )
    if not reasons:
        return None
    return f"skipped {path}: " + "; ".join(reasons) + " (the worker would dead-letter it)"


def file_roots_problem(folder: Path, settings: WorkerSettings) -> str | None:
    """Why a worker with these settings would refuse the folder's file:// events, if so.

    Only a hint: the workers may run with other settings than this command.
    """
    real = Path(os.path.realpath(folder))
    roots = settings.fetch.file_roots
    if any(real.is_relative_to(os.path.realpath(root)) for root in roots):
        return None
    return (
        f"the events name their images by file:// path, but fetch.file_roots "
        f"({', '.join(map(str, roots)) or 'empty, the default'}) does not cover {real}: a "
        "worker with these settings dead-letters them (image_fetch_refused); add the folder "
        "to the workers' fetch.file_roots, or publish with --inline"
    )


def _inline_event(
    path: Path, stream_id: str | None, settings: WorkerSettings
) -> tuple[FrameEvent | None, str | None]:
    """The inline event of `path`, or None and why it is skipped."""
    # Base64 is 4/3 of the file: the schema's data: URI bound is known before encoding.
    encoded_chars = (path.stat().st_size + 2) // 3 * 4 + len("data:image/jpeg;base64,")
    if encoded_chars > MAX_DATA_URI_CHARS:
        return None, (
            f"skipped {path}: its data: URI is about {encoded_chars} characters, over the "
            f"frame event schema's {MAX_DATA_URI_CHARS}; publish a file, s3 or https reference"
        )
    event = frame_event(path, stream_id, inline=True)
    return (None, problem) if (problem := inline_problem(path, event, settings)) else (event, None)


def _warn(line: str) -> None:
    print(f"emotion-worker produce: {line}", file=sys.stderr, flush=True)


class _Client:
    """The producer, with its delivery counts and any error that waiting will not fix."""

    def __init__(self, settings: WorkerSettings, report: PublishReport) -> None:
        from consumer.stream.kafka_io import producer_config

        self.report = report
        self.fatal: str | None = None
        self.all_down = False
        self.errors: list[str] = []
        # The worker's own producer settings (security included), without a transaction:
        # these events are published one by one.
        config = producer_config(settings.kafka, error_cb=self._on_error)
        config.pop("transactional.id", None)
        config["logger"] = _QUIET_CLIENT_LOG
        self.producer = Producer(config)

    def _on_error(self, error: KafkaError) -> None:
        self.errors.append(error.str())
        # Sorted as the worker sorts them: waiting cannot fix credentials, ACLs or TLS.
        if classify(error) in (ErrorKind.FATAL, ErrorKind.AUTH):
            self.fatal = self.fatal or (
                f"Kafka refused this client: {error.str()}; check the sasl.* / ssl.* entries "
                "of kafka.common_config and kafka.producer_config (or the topic ACLs)"
            )
        elif error.code() == KafkaError._ALL_BROKERS_DOWN:
            self.all_down = True

    def delivered(self, error: KafkaError | None, _msg: Message) -> None:
        if error is None:
            self.report.published += 1
        else:
            self.report.failed += 1
            self.report.errors.append(error.str())

    def wait_for_cluster(self, bootstrap_servers: str, timeout_s: float) -> None:
        """Fail fast, naming the setting to fix, if the cluster is unreachable or refuses us."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.producer.list_topics(timeout=0.5)
            except KafkaException:
                pass
            else:
                if self.fatal is None:
                    return
            self.producer.poll(0)  # serves error_cb
            if self.fatal is not None:
                raise PublishError(self.fatal)
            if self.all_down or time.monotonic() > deadline:
                raise PublishError(
                    f"cannot reach Kafka at {bootstrap_servers} "
                    f"({'; '.join(dict.fromkeys(self.errors)) or 'no answer'}); "
                    "pass --bootstrap-servers, or --config with kafka.bootstrap_servers"
                )


def publish_folder(
    folder: Path,
    settings: WorkerSettings,
    topic: str | None = None,
    stream_id: str | None = None,
    limit: int | None = None,
    inline: bool = False,
    create_partitions: int | None = None,
    warn: Callable[[str], None] = _warn,
    connect_timeout_s: float = 15.0,
    flush_timeout_s: float = 30.0,
) -> PublishReport:
    """Publish one event per image, keyed by stream id, with the worker's Kafka settings.

    `topic` defaults to kafka.input_topic. With `inline`, each image travels in its event as
    a data: URI; one the worker would dead-letter as too large is skipped with a warning.
    Raises PublishError when the cluster cannot be reached or refuses the client.
    """
    from consumer.stream.kafka_io import admin_config, ensure_topics

    paths = image_files(folder, limit)
    report = PublishReport(topic=topic or settings.kafka.input_topic)
    if not inline and (problem := file_roots_problem(folder, settings)):
        warn(problem)
    client = _Client(settings, report)
    client.wait_for_cluster(settings.kafka.bootstrap_servers, connect_timeout_s)
    if create_partitions:
        try:
            ensure_topics(
                settings.kafka.bootstrap_servers,
                [report.topic],
                partitions=create_partitions,
                extra_config=admin_config(settings.kafka),
            )
        except (KafkaException, RuntimeError) as exc:
            raise PublishError(f"--create-topic {report.topic}: {exc}") from exc
    producer = client.producer
    for path in paths:
        if inline:
            event, problem = _inline_event(path, stream_id, settings)
            if event is None:
                warn(str(problem))
                report.skipped += 1
                continue
        else:
            event = frame_event(path, stream_id)
        value = event.model_dump_json().encode()
        while True:
            try:
                producer.produce(
                    report.topic,
                    key=event.stream_id.encode(),
                    value=value,
                    on_delivery=client.delivered,
                )
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.5)
            except KafkaException as exc:  # e.g. over the client's message.max.bytes
                report.failed += 1
                report.errors.append(f"{path}: {exc.args[0].str()}")
                break
        producer.poll(0)
        if client.fatal is not None:
            break
    deadline = time.monotonic() + flush_timeout_s
    while producer.flush(0.5) and client.fatal is None and time.monotonic() < deadline:
        pass
    producer.purge()  # what is still undelivered fails now...
    producer.flush(5)  # ...and its delivery reports are served here
    if client.fatal is not None:
        report.errors.insert(0, client.fatal)
    unreported = len(paths) - report.skipped - report.published - report.failed
    if unreported > 0:  # never got a delivery report, not even a purge
        report.failed += unreported
        report.errors.append(f"{unreported} events got no delivery report")
    return report
