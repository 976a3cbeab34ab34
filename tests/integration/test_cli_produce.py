"""`emotion-worker produce` publishes one valid frame event per image of a folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from consumer.cli import main
from schemas import FrameEvent
from tests.conftest import FER_TRAIN
from tests.support.kafka import read


def test_produce_publishes_one_event_per_image(
    kafka_bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    topic = topic_factory("frames", 2)
    code = main(
        [
            "produce",
            str(FER_TRAIN),
            "--bootstrap-servers",
            kafka_bootstrap,
            "--topic",
            topic,
            "--limit",
            "21",
        ]
    )
    assert code == 0
    records = read(kafka_bootstrap, topic, expected=21, timeout_s=30, idle_s=1.0)
    assert len(records) == 21
    events = [FrameEvent.model_validate_json(r.value) for r in records]
    # --limit takes images round-robin over the class folders: 3 of each of the 7.
    streams = sorted(e.stream_id for e in events)
    assert streams == sorted([c.name for c in FER_TRAIN.iterdir() if c.is_dir()] * 3)
    for record, event in zip(records, events, strict=True):
        assert record.key == event.stream_id.encode()
        assert Path(event.image.removeprefix("file://")).is_file()
    assert len({e.event_id for e in events}) == 21
