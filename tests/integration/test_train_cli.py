"""`emotion-worker train` end to end: a few hundred FER faces, one epoch, from scratch.

The command runs as a user runs it (a subprocess of the CLI), on the shipped architecture,
and its output folder must be a checkpoint the worker's engine loads and uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from consumer.config import FER_LABELS, ModelSettings
from consumer.engine import EmotionEngine
from consumer.engine.loader import validate_checkpoint
from tests.conftest import FER_FACES, REPO

PER_CLASS = {label: 43 for label in FER_LABELS} | {"disgusted": 12, "happy": 60}


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~300 FER faces (symlinks), the rare class rare, in the class-per-folder layout."""
    root = tmp_path_factory.mktemp("fer-subset")
    for label, count in PER_CLASS.items():
        (root / label).mkdir()
        for image in sorted((FER_FACES / label).glob("*.png"))[:count]:
            (root / label / image.name).symlink_to(image)
    return root


def test_one_epoch_from_scratch_writes_a_checkpoint_the_worker_loads(
    subset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "model"
    argv = [
        "--data", str(subset), "--out", str(out), "--epochs", "1", "--from-scratch",
        "--threads", "2", "--seed", "3",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # `train --`: the top-level parser hands everything after the separator to train.
    done = subprocess.run(
        [sys.executable, "-m", "consumer.cli", "train", "--", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch 1/1" in done.stderr  # the progress bar
    assert "epoch 1/1: loss" in done.stdout and "val acc" in done.stdout  # per-epoch line

    names = {item.name for item in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "split.json",
        "training_args.json",
        "train_log.jsonl",
        "eval_report.json",
        "README.md",
    } <= names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth"))]
    assert sum(item.stat().st_size for item in out.iterdir()) < 20 * 1024 * 1024
    validate_checkpoint(out)

    split = json.loads((out / "split.json").read_text())
    total = sum(PER_CLASS.values())
    assert len(split["train"]) + len(split["val"]) == total
    assert not set(split["train"]) & set(split["val"])
    val_classes = Counter(path.split("/")[0] for path in split["val"])
    assert val_classes == {label: round(n * 0.1) or 1 for label, n in PER_CLASS.items()}

    args = json.loads((out / "training_args.json").read_text())
    assert args["status"] == "finished"
    assert args["seed"] == 3 and args["epochs"] == 1 and args["arch"] == "small"
    assert args["data"] == str(subset.resolve())
    assert args["counts"]["val"] == dict(val_classes)
    assert args["versions"]["torch"] and args["wall_time_s"] > 0
    assert args["command"].startswith("emotion-worker train --data")

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [record["epoch"] for record in log] == [1]
    assert 0 <= log[0]["val_accuracy"] <= 1 and log[0]["train_loss"] > 0

    report = json.loads((out / "eval_report.json").read_text())
    assert report["images"] == len(split["val"])
    assert report["accuracy"] == pytest.approx(log[0]["val_accuracy"], abs=0.005)
    assert "## Reproduce" in (out / "README.md").read_text()

    engine = EmotionEngine.load(ModelSettings(path=out, device="cpu"))
    faces = []
    for relative in split["val"][:8]:
        with Image.open(subset / relative) as image:
            faces.append(image.copy())
    results = engine.classify(faces)
    assert len(results) == 8
    assert all(
        r.label in FER_LABELS and sum(r.scores.values()) == pytest.approx(1) for r in results
    )
