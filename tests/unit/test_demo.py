"""The demo's choice of faces: the model's own validation split when it has one."""

from __future__ import annotations

import json
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
