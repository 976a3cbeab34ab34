"""`emotion-worker produce` publishes one valid frame event per image of a folder.

With `--config` it uses the worker's own Kafka settings (security included) and input
topic; with `--inline` each image travels inside its event as a data: URI.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from PIL import Image

from consumer.cli import main
from consumer.event_source import image_files
from deploy.kafka.local_broker import LocalKafkaBroker, SaslUser, free_port
from schemas import DeadLetter, EmotionResult, FrameEvent
from tests.conftest import FER_FACES
from tests.support.kafka import read
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.kafka

USER = "producer"
PASSWORD = "s3cret-Producer-pw-2b9e"
WRONG_PASSWORD = "not-the-Password-51d7"


def _toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _events(bootstrap: str, topic: str, expected: int) -> list[FrameEvent]:
    records = read(bootstrap, topic, expected=expected, timeout_s=30, idle_s=1.0)
    return [FrameEvent.model_validate_json(r.value) for r in records]


def test_produce_publishes_one_event_per_image(
    kafka_bootstrap: str, topic_factory: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    topic = topic_factory("frames", 2)
    code = main(
        [
            "produce",
            str(FER_FACES),
            "--bootstrap-servers",
            kafka_bootstrap,
            "--topic",
            topic,
            "--limit",
            "21",
        ]
    )
    assert code == 0
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(f"published 21 frame events to {topic} (0 failed, 0 skipped)")
    )
    records = read(kafka_bootstrap, topic, expected=21, timeout_s=30, idle_s=1.0)
    assert len(records) == 21
    events = [FrameEvent.model_validate_json(r.value) for r in records]
    # --limit takes images round-robin over the class folders: 3 of each of the 7.
    streams = sorted(e.stream_id for e in events)
    assert streams == sorted([c.name for c in FER_FACES.iterdir() if c.is_dir()] * 3)
    for record, event in zip(records, events, strict=True):
        assert record.key == event.stream_id.encode()
        assert event.image.startswith("file:///")
        assert Path(event.image.removeprefix("file://")).is_file()
    assert len({e.event_id for e in events}) == 21


def test_produce_takes_cluster_and_topic_from_config(
    kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    topic = topic_factory("frames")
    config = _toml(
        tmp_path / "worker.toml",
        f'[kafka]\nbootstrap_servers = "{kafka_bootstrap}"\ninput_topic = "{topic}"\n'
        '[kafka.producer_config]\n"compression.type" = "zstd"\n',
    )
    assert main(["produce", str(FER_FACES), "--config", str(config), "--limit", "7"]) == 0
    assert len(_events(kafka_bootstrap, topic, 7)) == 7


def test_produce_flags_beat_config(
    kafka_bootstrap: str, topic_factory: Callable[..., str], tmp_path: Path
) -> None:
    topic = topic_factory("frames")
    config = _toml(  # a cluster and a topic that are not there: the flags replace both
        tmp_path / "worker.toml",
        f'[kafka]\nbootstrap_servers = "127.0.0.1:{free_port()}"\ninput_topic = "nowhere"\n',
    )
    code = main(
        [
            "produce",
            str(FER_FACES),
            "--config",
            str(config),
            "--bootstrap-servers",
            kafka_bootstrap,
            "--topic",
            topic,
            "--limit",
            "2",
        ]
    )
    assert code == 0
    assert len(_events(kafka_bootstrap, topic, 2)) == 2


def test_produce_names_the_flag_when_the_cluster_is_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    code = main(["produce", str(FER_FACES), "--bootstrap-servers", f"127.0.0.1:{free_port()}"])
    assert code == 1
    assert time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert "cannot reach Kafka" in err and "--bootstrap-servers" in err, err


def test_produce_inline_events_carry_the_image_bytes(
    kafka_bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory("frames")
    code = main(
        [
            "produce",
            str(FER_FACES),
            "--bootstrap-servers",
            kafka_bootstrap,
            "--topic",
            topic,
            "--inline",
            "--limit",
            "7",
        ]
    )
    assert code == 0
    events = _events(kafka_bootstrap, topic, 7)
    prefix = "data:image/png;base64,"
    assert len(events) == 7 and all(e.image.startswith(prefix) for e in events)
    sent = sorted(base64.b64decode(e.image.removeprefix(prefix), validate=True) for e in events)
    assert sent == sorted(p.read_bytes() for p in image_files(FER_FACES, limit=7))
    assert {e.stream_id for e in events} == {c.name for c in FER_FACES.iterdir() if c.is_dir()}


@pytest.mark.parametrize("cap", ["event", "data"])
def test_produce_inline_skips_what_the_worker_would_refuse_as_too_large(
    cap: str,
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    small = folder / "small.png"
    shutil.copy(next(FER_FACES.joinpath("happy").glob("*.png")), small)
    big = folder / "big.png"  # noise does not compress: about 40 KB
    noise = np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8)
    Image.fromarray(noise).save(big)
    assert big.stat().st_size > 30_000 and small.stat().st_size < 8_000
    topic = topic_factory("frames")
    limits = (
        "[flow]\nmax_event_bytes = 16384\n"
        if cap == "event"
        else "[flow]\nmax_event_bytes = 1000000\n[fetch]\nmax_data_uri_bytes = 16384\n"
    )
    config = _toml(
        tmp_path / "worker.toml",
        f'[kafka]\nbootstrap_servers = "{kafka_bootstrap}"\ninput_topic = "{topic}"\n{limits}',
    )
    assert main(["produce", str(folder), "--config", str(config), "--inline"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"published 1 frame events to {topic} (0 failed, 1 skipped)"
    warnings = err.strip().splitlines()
    assert len(warnings) == 1 and "big.png" in warnings[0], err
    if cap == "event":
        event_size = len(json.dumps({"image": base64.b64encode(big.read_bytes()).decode()}))
        assert "flow.max_event_bytes=16384" in warnings[0]
        size = int(warnings[0].split("event is ")[1].split(" bytes")[0])
        assert event_size < size < event_size + 300  # the whole serialized event
    else:
        assert "fetch.max_data_uri_bytes" in warnings[0] and "16384" in warnings[0]
    events = _events(kafka_bootstrap, topic, 1)
    assert len(events) == 1
    assert base64.b64decode(events[0].image.partition(",")[2]) == small.read_bytes()


def test_produce_fails_when_deliveries_fail(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The broker refuses records over the topic's max.message.bytes; inline faces are ~3 KB.
    topic = f"small-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    new = NewTopic(
        topic, num_partitions=1, replication_factor=-1, config={"max.message.bytes": "1024"}
    )
    admin.create_topics([new])[topic].result(30)
    code = main(
        [
            "produce",
            str(FER_FACES),
            "--bootstrap-servers",
            kafka_bootstrap,
            "--topic",
            topic,
            "--inline",
            "--limit",
            "3",
        ]
    )
    assert code == 1
    out, err = capsys.readouterr()
    assert out.strip() == f"published 0 frame events to {topic} (3 failed, 0 skipped)"
    assert "delivery failed" in err and "too large" in err.lower(), err


def test_inline_event_is_processed_by_a_worker_that_cannot_read_the_file(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
) -> None:
    frames, out, dead = topic_factory("frames"), topic_factory("emotions"), topic_factory("dead")
    folder = tmp_path / "camera-7"
    folder.mkdir()
    shutil.copy(next(FER_FACES.joinpath("happy").glob("*.png")), folder / "face.png")
    flags = ["--bootstrap-servers", kafka_bootstrap, "--topic", frames]
    assert main(["produce", str(folder), *flags, "--inline"]) == 0
    assert main(["produce", str(folder), *flags]) == 0  # the file:// twin, for contrast
    allowed = tmp_path / "elsewhere"
    allowed.mkdir()
    worker = start_worker(
        kafka__input_topic=frames,
        kafka__output_topic=out,
        kafka__dead_letter_topic=dead,
        kafka__group_id=f"group-{frames}",
        fetch__file_roots=json.dumps([str(allowed)]),  # the image's folder is not readable
        fetch__retries="0",
    )
    results = [
        EmotionResult.model_validate_json(r.value)
        for r in read(kafka_bootstrap, out, expected=1, timeout_s=120, idle_s=1.0)
    ]
    letters = [
        DeadLetter.from_record(r.key, r.value, r.headers)
        for r in read(kafka_bootstrap, dead, expected=1, timeout_s=60)
    ]
    assert worker.stop() == 0, worker.log_text()[-3000:]
    assert len(results) == 1, worker.log_text()[-3000:]
    assert results[0].status == "ok" and results[0].source.offset == 0
    assert results[0].stream_id == "camera-7" and len(results[0].faces) == 1
    assert len(letters) == 1 and letters[0].source.offset == 1
    assert letters[0].error_kind == "image_fetch_refused"


@pytest.fixture(scope="module")
def sasl_broker() -> Iterator[LocalKafkaBroker]:
    with LocalKafkaBroker(sasl_users=[SaslUser(USER, PASSWORD)]) as broker:
        yield broker


def _sasl_config(tmp_path: Path, broker: LocalKafkaBroker, topic: str) -> Path:
    """The worker's config for the SASL listener; the password comes from the environment."""
    return _toml(
        tmp_path / "worker.toml",
        f"""
[kafka]
bootstrap_servers = "{broker.sasl_bootstrap_servers}"
input_topic = "{topic}"

[kafka.common_config]
"security.protocol" = "SASL_PLAINTEXT"
"sasl.mechanism" = "SCRAM-SHA-512"
"sasl.username" = "{USER}"
""",
    )


def test_produce_over_sasl_with_the_workers_config(
    sasl_broker: LocalKafkaBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = f"frames-{uuid.uuid4().hex[:10]}"  # created by produce, over SASL
    config = _sasl_config(tmp_path, sasl_broker, topic)
    monkeypatch.setenv("EMOTION_WORKER_KAFKA__COMMON_CONFIG__sasl.password", PASSWORD)
    args = ["produce", str(FER_FACES), "--config", str(config), "--limit", "7"]
    assert main([*args, "--create-topic", "2", "--inline"]) == 0
    assert capsys.readouterr().out.strip().endswith(f"to {topic} (0 failed, 0 skipped)")
    events = _events(sasl_broker.bootstrap_servers, topic, 7)  # read back over PLAINTEXT
    assert len(events) == 7 and all(e.image.startswith("data:image/png;base64,") for e in events)


def test_produce_over_sasl_with_a_wrong_password_stops_and_says_why(
    sasl_broker: LocalKafkaBroker,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic = f"frames-{uuid.uuid4().hex[:10]}"
    config = _sasl_config(tmp_path, sasl_broker, topic)
    monkeypatch.setenv("EMOTION_WORKER_KAFKA__COMMON_CONFIG__sasl.password", WRONG_PASSWORD)
    started = time.monotonic()
    code = main(["produce", str(FER_FACES), "--config", str(config), "--create-topic", "1"])
    assert code == 1
    assert time.monotonic() - started < 15
    out, err = capsys.readouterr()
    assert "authentication" in err.lower() and "sasl" in err, err
    assert WRONG_PASSWORD not in out + err
    admin = AdminClient({"bootstrap.servers": sasl_broker.bootstrap_servers})
    assert topic not in admin.list_topics(timeout=10).topics  # nothing was created
