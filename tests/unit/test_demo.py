"""The demo's choice of faces: the model's own validation split when it has one."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from consumer.demo import held_out_faces


def _folder(root: Path, counts: dict[str, int]) -> list[str]:
    relative = []
    for label, count in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            (root / label / f"{i}.png").write_bytes(b"png")
            relative.append(f"{label}/{i}.png")
    return relative


def test_validation_faces_round_robin_over_classes(tmp_path: Path) -> None:
    data, model = tmp_path / "data", tmp_path / "model"
    paths = _folder(data, {"happy": 6, "sad": 3, "angry": 1})
    model.mkdir()
    (model / "split.json").write_text(json.dumps({"train": paths[:2], "val": paths[2:]}))
    picked = held_out_faces(data, model, 6)
    assert picked is not None and len(picked) == 6
    assert {p.relative_to(data).as_posix() for p in picked} <= set(paths[2:])
    assert Counter(p.parent.name for p in picked) == {"angry": 1, "happy": 3, "sad": 2}
    assert len(held_out_faces(data, model, 100) or []) == len(paths) - 2


def test_no_split_or_a_split_of_another_folder_gives_none(tmp_path: Path) -> None:
    data, model = tmp_path / "data", tmp_path / "model"
    paths = _folder(data, {"happy": 2})
    model.mkdir()
    assert held_out_faces(data, model, 5) is None  # no split.json
    (model / "split.json").write_text(json.dumps({"val": ["elsewhere/1.png"]}))
    assert held_out_faces(data, model, 5) is None  # the split names other files
    (model / "split.json").write_text("{not json")
    assert held_out_faces(data, model, 5) is None
    (model / "split.json").write_text(json.dumps({"val": paths}))
    assert held_out_faces(data, model, 5) == [data / p for p in paths]


def test_a_folder_with_part_of_the_split_gives_that_part(tmp_path: Path) -> None:
    data, model = tmp_path / "data", tmp_path / "model"
    present = _folder(data, {"happy": 2, "sad": 1})
    model.mkdir()
    split = {"train": ["happy/t.png"], "val": [*present, "happy/missing.png", "sad/gone.png"]}
    (model / "split.json").write_text(json.dumps(split))
    picked = held_out_faces(data, model, 10)
    assert picked is not None
    assert sorted(p.relative_to(data).as_posix() for p in picked) == sorted(present)


def test_the_committed_faces_are_validation_faces_the_model_never_trained_on() -> None:
    from tests.conftest import FER_CHECKPOINT, FER_FACES

    split = json.loads((FER_CHECKPOINT / "split.json").read_text())
    committed = {p.relative_to(FER_FACES).as_posix() for p in FER_FACES.rglob("*.png")}
    assert len(committed) == 404
    assert committed <= set(split["val"])
    assert not committed & set(split["train"])
    # Every class is there, disgusted (44 in the split) whole, the others 60 each.
    assert Counter(path.split("/")[0] for path in committed) == {
        "angry": 60,
        "disgusted": 44,
        "fearful": 60,
        "happy": 60,
        "neutral": 60,
        "sad": 60,
        "surprised": 60,
    }
    # Exactly the draw data/faces/README.md documents, so anyone can make the folder again.
    rng, drawn = random.Random(2026), set()
    for label in sorted({path.split("/")[0] for path in split["val"]}):
        paths = sorted(p for p in split["val"] if p.startswith(f"{label}/"))
        drawn |= set(rng.sample(paths, min(60, len(paths))))
    assert committed == drawn
    held_out = held_out_faces(FER_FACES, FER_CHECKPOINT, 300)
    assert held_out is not None and len(held_out) == 300
