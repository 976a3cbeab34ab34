"""s3:// images end to end: real FER faces in a moto S3, the real worker, the real broker."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from schemas import DeadLetter, EmotionResult
from tests.support.events import event_bytes
from tests.support.kafka import committed, end_offsets, produce, read
from tests.support.s3_server import DUMMY_KEY_ID, DUMMY_SECRET, S3Server
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.kafka

BUCKET = "fer-frames"
FACES = 20


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    with S3Server(log_path=tmp_path / "moto.log") as server:
        server.create_bucket(BUCKET)
        yield server


def test_s3_images_get_results_and_a_missing_key_a_dead_letter(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_worker: Callable[..., WorkerProcess],
    face_paths: list[Path],
    s3: S3Server,
) -> None:
    frames = topic_factory("frames", 2)
    out = topic_factory("emotions", 2)
    dead = topic_factory("dead", 1)
    group = f"group-{frames}"

    values: list[tuple[bytes | None, bytes]] = []
    for i, path in enumerate(face_paths[:FACES]):
        key = f"cam-{i % 3}/{i:04d} {path.name}"  # a space: keys are taken literally
        s3.put(BUCKET, key, path.read_bytes())
        values.append(
            event_bytes(
                path, stream_id=f"cam-{i % 3}", event_id=f"s3-{i}", image=f"s3://{BUCKET}/{key}"
            )
        )
    missing_uri = f"s3://{BUCKET}/cam-0/never-uploaded.png"
    values.insert(
        7, event_bytes(face_paths[0], stream_id="cam-0", event_id="s3-missing", image=missing_uri)
    )
    produce(kafka_bootstrap, frames, values, spread=2)

    worker = start_worker(
        kafka__input_topic=frames,
        kafka__output_topic=out,
        kafka__dead_letter_topic=dead,
        kafka__group_id=group,
        fetch__retries="0",
        fetch__s3__endpoint_url=s3.endpoint_url,
        fetch__s3__addressing_style="path",
        fetch__s3__region="us-east-1",
        fetch__s3__access_key_id=DUMMY_KEY_ID,
        fetch__s3__secret_access_key=DUMMY_SECRET,
    )
    records = read(kafka_bootstrap, out, expected=FACES, timeout_s=120, idle_s=1.0)
    letters = read(kafka_bootstrap, dead, expected=1, timeout_s=60)
    assert worker.stop() == 0, worker.log_text()[-3000:]

    results = [EmotionResult.model_validate_json(r.value) for r in records]
    assert sorted(r.event_id for r in results) == sorted(f"s3-{i}" for i in range(FACES))
    for result in results:
        assert result.status == "ok" and len(result.faces) == 1
        # The decoded S3 object is the 48x48 FER face that was uploaded.
        assert result.faces[0].box.width == result.faces[0].box.height == 48

    assert len(letters) == 1
    letter = DeadLetter.from_record(letters[0].key, letters[0].value, letters[0].headers)
    assert letter.event_id == "s3-missing"
    assert letter.error_kind == "image_not_found", letter.error_message
    assert missing_uri in letter.error_message
    assert json.loads(letter.value)["image"] == missing_uri
    assert committed(kafka_bootstrap, group, frames, 2) == end_offsets(kafka_bootstrap, frames, 2)
