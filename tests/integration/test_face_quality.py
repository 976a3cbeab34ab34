"""Face quality on the real broker: every face carries its quality, and with
faces.min_quality set a low-quality face is skipped (no label, a reason) while the event's
other faces are classified. The raw results are checked against the exported v2 schema,
as a strict non-Python reader would."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
from PIL import Image

from schemas import ClassifiedFace, EmotionResult, FaceBox, SkippedFace
from schemas.export import schema_path
from tests.support.events import event_bytes
from tests.support.kafka import produce, read

pytestmark = pytest.mark.kafka

GOOD = FaceBox(x=20, y=20, width=96, height=96)
TINY = FaceBox(x=200, y=40, width=14, height=14)


def _frame(folder: Path, face_path: Path) -> Path:
    """A 320x160 frame: a real FER face enlarged to 96 px, and a 14 px copy of it."""
    face = Image.open(face_path).convert("RGB")
    frame = Image.new("RGB", (320, 160), (110, 120, 130))
    frame.paste(face.resize((GOOD.width, GOOD.height), Image.Resampling.BICUBIC), (GOOD.x, GOOD.y))
    frame.paste(face.resize((TINY.width, TINY.height)), (TINY.x, TINY.y))
    path = folder / "two-faces.png"
    frame.save(path)
    return path


def test_quality_in_every_face_and_min_quality_skips_the_tiny_one(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_worker: Callable[..., object],
    face_paths: list[Path],
    tmp_path: Path,
) -> None:
    frames = topic_factory("frames", 1)
    out = topic_factory("emotions", 1)
    frame = _frame(tmp_path, face_paths[0])
    values = [
        event_bytes(frame, event_id="both", faces=[GOOD.model_dump(), TINY.model_dump()]),
        event_bytes(frame, event_id="tiny", faces=[TINY.model_dump()]),
        event_bytes(face_paths[1], event_id="fer"),  # the whole image is the face
    ]
    produce(kafka_bootstrap, frames, values)
    worker = start_worker(
        kafka__input_topic=frames,
        kafka__output_topic=out,
        kafka__dead_letter_topic=topic_factory("dead", 1),
        kafka__group_id=f"group-{frames}",
        faces__min_quality="0.5",
    )
    records = read(kafka_bootstrap, out, expected=len(values), timeout_s=120)
    assert worker.stop() == 0, worker.log_text()[-3000:]  # type: ignore[attr-defined]

    schema = json.loads(schema_path("emotion_result").read_text(encoding="utf-8"))
    for record in records:
        jsonschema.validate(json.loads(record.value), schema)
    results = {r.event_id: r for r in (EmotionResult.model_validate_json(m.value) for m in records)}
    assert set(results) == {"both", "tiny", "fer"}

    both = results["both"]
    assert both.schema_version == 2 and both.status == "ok"
    good, tiny = both.faces
    assert isinstance(good, ClassifiedFace) and good.box == GOOD
    assert good.quality.score == 1.0 and good.quality.flags == []
    assert (good.quality.width, good.quality.height) == (96, 96)
    assert good.quality.vouched_by == "event" and good.quality.sharpness > 0
    assert 0 < good.quality.brightness < 1 and 0 < good.quality.contrast <= 1
    assert abs(sum(good.scores.values()) - 1) < 1e-4
    assert isinstance(tiny, SkippedFace) and tiny.box == TINY
    assert tiny.quality.flags[0] == "small" and tiny.quality.score < 0.5
    assert tiny.reason.startswith(f"quality {tiny.quality.score:.3g} < faces.min_quality 0.5")
    raw_tiny = json.loads(next(r.value for r in records if b'"both"' in r.value))["faces"][1]
    assert "label" not in raw_tiny and "scores" not in raw_tiny  # explicit: no label at all

    assert results["tiny"].status == "skipped" and len(results["tiny"].faces) == 1
    fer = results["fer"]
    assert fer.status == "ok" and isinstance(fer.faces[0], ClassifiedFace)
    assert (
        fer.faces[0].quality.vouched_by == "none"
        and "no_face_found" not in fer.faces[0].quality.flags
    )
