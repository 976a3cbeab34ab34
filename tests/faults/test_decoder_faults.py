"""Decoder processes that crash, hang or exit mid-stream: one dead letter each, no stall."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faults.checker import Stream
from tests.support.events import event_bytes
from tests.support.kafka import end_offsets
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.kafka


def test_decoder_crashes_and_hangs_cost_one_event_each(
    make_stream: Callable[..., Stream],
    start_worker: Callable[..., WorkerProcess],
    face_paths: list[Path],
) -> None:
    stream = make_stream(partitions=2)
    stream.publish(face_paths, 60)
    faults = {b"CRASH": "killed by SIGSEGV", b"HANG": "decode.timeout_s", b"EXIT": "exit status 3"}
    expected: dict[tuple[int, int], str] = {}
    for index, (payload, words) in enumerate(faults.items()):
        uri = "data:image/png;base64," + base64.b64encode(payload).decode()
        _, value = event_bytes(face_paths[0], event_id=f"fault-{index}", image=uri)
        (coord,) = stream.publish_poison([value], partition=index % 2)
        expected[coord] = words
    stream.publish(face_paths, 60, start=60)
    worker = start_worker(
        module="tests.faults.faulty_decoder_worker",
        **stream.settings(decode__timeout_s="2", decode__workers="2"),
    )
    report = stream.report("8. decoder crash, hang, exit", note="3 faulty images in 123 events")
    letters = stream.dead_letters()
    assert worker.stop() == 0, worker.log_text()[-3000:]

    assert report.missing == 0 and report.duplicates == 0
    got = {(d.source.partition, d.source.offset): d for d in letters}
    assert set(got) == set(expected)
    for coord, words in expected.items():
        assert got[coord].error_kind == "image_undecodable"
        assert words in got[coord].error_message, got[coord].error_message
    crashes = [e for e in worker.log_events() if e.get("event") == "decoder process crashed"]
    assert len(crashes) == 2  # the segfault and the exit; the hang is a timeout
    assert stream.committed() == end_offsets(stream.bootstrap, stream.input_topic, 2)
