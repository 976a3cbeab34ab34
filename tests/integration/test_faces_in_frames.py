"""Whole frames through the worker: several faces give one result with a face each,
a frame without a face gives status no_face, and event boxes are grown by the margin."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from schemas import ClassifiedFace, EmotionResult, FaceBox
from tests.support.events import event_bytes
from tests.support.kafka import produce, read

pytestmark = pytest.mark.kafka

# The astronaut photograph that ships in scikit-image, and its face (hand-labelled).
FACE = (182, 76, 269, 184)


def _iou(a: FaceBox, b: tuple[int, int, int, int]) -> float:
    left, top = max(a.x, b[0]), max(a.y, b[1])
    right, bottom = min(a.x + a.width, b[2]), min(a.y + a.height, b[3])
    inter = max(0, right - left) * max(0, bottom - top)
    union = a.width * a.height + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _frames(folder: Path) -> dict[str, tuple[Path, list[tuple[int, int, int, int]]]]:
    """Test frames and their true face boxes."""
    photo = Image.fromarray(np.asarray(data.astronaut()))
    face = photo.crop((FACE[0] - 40, FACE[1] - 40, FACE[2] + 40, FACE[3] + 40))
    rng = np.random.default_rng(5)
    canvas = Image.fromarray(rng.integers(90, 160, size=(480, 900, 3), dtype=np.uint8))
    truth = []
    for left in (20, 330, 640):
        canvas.paste(face, (left, 120))
        truth.append((left + 40, 160, left + 40 + FACE[2] - FACE[0], 160 + FACE[3] - FACE[1]))
    empty = Image.fromarray(rng.integers(90, 160, size=(480, 640, 3), dtype=np.uint8))
    frames = {"three": (canvas, truth), "photo": (photo, [FACE]), "empty": (empty, [])}
    out = {}
    for name, (image, boxes) in frames.items():
        path = folder / f"{name}.jpg"
        image.save(path, quality=92)
        out[name] = (path, boxes)
    return out


def test_detector_frames_give_one_result_per_frame_with_every_face(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_worker: Callable[..., object],
    tmp_path: Path,
) -> None:
    frames = topic_factory("frames", 1)
    out = topic_factory("emotions", 1)
    made = _frames(tmp_path)
    given = FaceBox(x=100, y=100, width=100, height=50)
    values = [event_bytes(path, event_id=name) for name, (path, _) in made.items()]
    # Boxes from upstream skip detection; the margin still grows them.
    values.append(event_bytes(made["empty"][0], event_id="given", faces=[given.model_dump()]))
    produce(kafka_bootstrap, frames, values)
    worker = start_worker(
        kafka__input_topic=frames,
        kafka__output_topic=out,
        kafka__dead_letter_topic=topic_factory("dead", 1),
        kafka__group_id=f"group-{frames}",
        faces__detector="haar",
        faces__margin="0.1",
    )
    results = {
        r.event_id: r
        for r in (
            EmotionResult.model_validate_json(m.value)
            for m in read(kafka_bootstrap, out, expected=len(values), timeout_s=120)
        )
    }
    assert worker.stop() == 0, worker.log_text()[-3000:]

    assert results["empty"].status == "no_face" and results["empty"].faces == []
    for name in ("three", "photo"):
        result = results[name]
        truth = made[name][1]
        assert result.status == "ok"
        assert len(result.faces) == len(truth), result.faces
        for box in truth:
            # Every true face is matched by a detected (and margin-grown) box.
            assert max(_iou(f.box, box) for f in result.faces) >= 0.4, (name, box, result.faces)
        for face in result.faces:
            assert isinstance(face, ClassifiedFace) and face.quality.vouched_by == "detector"
            assert abs(sum(face.scores.values()) - 1) < 1e-4
    given = results["given"].faces[0]
    assert given.box == FaceBox(x=90, y=95, width=120, height=60)
    assert given.quality.vouched_by == "event"
    assert (given.quality.width, given.quality.height) == (120, 60)
