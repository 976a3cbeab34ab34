"""Malformed events land in the dead-letter topic with their reason; good ones still pass."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from schemas import DeadLetter, EmotionResult
from tests.support.events import event_bytes
from tests.support.http_server import ImageServer
from tests.support.kafka import committed, end_offsets, produce, read

pytestmark = pytest.mark.kafka


def test_malformed_events_become_dead_letters(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_worker: Callable[..., object],
    face_paths: list[Path],
    junk_files: dict[str, Path],
) -> None:
    frames = topic_factory("frames", 1)
    out = topic_factory("emotions", 1)
    dead = topic_factory("dead", 1)
    group = f"group-{frames}"
    good = [event_bytes(p) for p in face_paths[:20]]
    key, valid = event_bytes(face_paths[0])
    valid_json = json.loads(valid)
    missing_image = junk_files["face"].parent / "no-such-face.png"

    with ImageServer(junk_files["face"].parent) as server:
        bad: list[tuple[bytes, str, str]] = [
            (b"{not json", "not_json", "not UTF-8 JSON"),
            (b"\xff\xfe\x00binary", "not_json", "not UTF-8 JSON"),
            (
                json.dumps({k: v for k, v in valid_json.items() if k != "stream_id"}).encode(),
                "invalid_event",
                "stream_id",
            ),
            (
                json.dumps({**valid_json, "captured_at": 12}).encode(),
                "invalid_event",
                "captured_at",
            ),
            (json.dumps({**valid_json, "colour": "red"}).encode(), "invalid_event", "colour"),
            (
                json.dumps({**valid_json, "image": "ftp://host/x.png"}).encode(),
                "invalid_event",
                "image",
            ),
            (
                json.dumps({**valid_json, "event_id": "x" * 70_000}).encode(),
                "event_too_large",
                "max_event_bytes",
            ),
            (  # missing, in a folder of fetch.file_roots
                event_bytes(junk_files["face"], image=missing_image.as_uri())[1],
                "image_not_found",
                str(missing_image),
            ),
            (  # outside fetch.file_roots: refused, the message names the setting
                event_bytes(junk_files["face"], image="file:///no/such/face.png")[1],
                "image_fetch_refused",
                "fetch.file_roots",
            ),
            (event_bytes(junk_files["garbage"])[1], "image_undecodable", "cannot be decoded"),
            (event_bytes(junk_files["text"])[1], "image_undecodable", "cannot be decoded"),
            (
                event_bytes(junk_files["face"], image=f"{server.url}/missing.png")[1],
                "image_not_found",
                "404",
            ),
            (
                event_bytes(junk_files["face"], faces=[{"x": 60, "y": 0, "width": 5, "height": 5}])[
                    1
                ],
                "bad_face_box",
                "faces[0]",
            ),
        ]
        # Interleave: a bad event after every good one, all in one partition.
        values: list[tuple[bytes | None, bytes]] = []
        expected_kind: dict[int, tuple[str, str]] = {}
        for i in range(max(len(good), len(bad))):
            if i < len(good):
                values.append(good[i])
            if i < len(bad):
                expected_kind[len(values)] = bad[i][1:]
                values.append((key, bad[i][0]))
        produce(kafka_bootstrap, frames, values)
        worker = start_worker(
            kafka__input_topic=frames,
            kafka__output_topic=out,
            kafka__dead_letter_topic=dead,
            kafka__group_id=group,
            fetch__retries="0",
        )
        letters = [
            DeadLetter.from_record(r.key, r.value, r.headers)
            for r in read(kafka_bootstrap, dead, expected=len(bad), timeout_s=120)
        ]
        results = [
            EmotionResult.model_validate_json(r.value)
            for r in read(kafka_bootstrap, out, expected=len(good), timeout_s=120)
        ]
        assert worker.stop() == 0, worker.log_text()[-3000:]

    assert len(letters) == len(bad)
    for letter in letters:
        kind, text = expected_kind[letter.source.offset]
        assert letter.error_kind == kind, letter
        assert text in letter.error_message, letter.error_message
        assert letter.source.topic == frames
        assert letter.value == values[letter.source.offset][1]  # original bytes kept
        assert letter.attempts >= 1
    # One warning line per dead letter, with its coordinates and reason bound (JSON logs).
    lines = [json.loads(line) for line in worker.log_text().splitlines() if line.startswith("{")]
    warned = {e["offset"]: e for e in lines if e.get("event") == "dead letter"}
    assert set(warned) == set(expected_kind)
    for offset, entry in warned.items():
        assert entry["level"] == "warning" and entry["partition"] == 0
        assert entry["reason"].startswith(expected_kind[offset][0])
    assert len(results) == len(good)
    good_offsets = set(range(len(values))) - set(expected_kind)
    assert {r.source.offset for r in results} == good_offsets
    assert committed(kafka_bootstrap, group, frames, 1) == end_offsets(kafka_bootstrap, frames, 1)
