"""The committed FER model (models/llava-fer-small): what it is, what it scores, and that the
worker's fast path reproduces the plain Hugging Face forward on it.

Unlike the tiny random checkpoint, this model has learned something, so its scores are far
from uniform and a wrong pixel pipeline, a wrong label token or a wrong sequence position
shows up as lost accuracy here rather than as noise that happens to pass.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from PIL import Image

from consumer.config import FER_LABELS, ModelSettings
from consumer.engine import EmotionEngine
from consumer.engine.loader import validate_checkpoint
from consumer.engine.preprocess import DevicePreprocessor, ProcessorSpec
from consumer.eval.identity import checkpoint_identity
from tests.conftest import FER_CHECKPOINT, FER_FACES, FER_REPORT

FER_FLIP_REPORT = FER_REPORT.with_name(FER_REPORT.name + "-flip")

# A floor under the 0.5.0 model (59.4%, macro-F1 0.555 on the validation split of its
# split.json): a retrain must not fall back; issue 17's target is 67% and 0.60.
TARGET_ACCURACY = 0.585
TARGET_MACRO_F1 = 0.54
TARGET_ECE = 0.05


def _val_paths() -> list[str]:
    split = json.loads((FER_CHECKPOINT / "split.json").read_text(encoding="utf-8"))
    paths: list[str] = split["val"]
    return paths


def _committed_paths() -> list[str]:
    """The validation faces committed in data/faces, in the split's order."""
    return [path for path in _val_paths() if (FER_FACES / path).is_file()]


def _load(relative: str) -> Image.Image:
    with Image.open(FER_FACES / relative) as image:
        image.load()
        return image.copy()


@pytest.fixture(scope="module")
def val_faces() -> list[tuple[Image.Image, str]]:
    """The committed faces of the validation split, with their folder name (the truth)."""
    return [(_load(path), path.split("/")[0]) for path in _committed_paths()]


@pytest.fixture(scope="module")
def engine() -> EmotionEngine:
    return EmotionEngine.load(ModelSettings(path=FER_CHECKPOINT, device="cpu"), max_batch_size=64)


def test_checkpoint_is_small_safe_and_documented() -> None:
    validate_checkpoint(FER_CHECKPOINT)
    files = {item.name: item for item in FER_CHECKPOINT.iterdir()}
    assert "model.safetensors" in files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert sum(item.stat().st_size for item in files.values()) <= 20 * 1024 * 1024
    args = json.loads(files["training_args.json"].read_text(encoding="utf-8"))
    # One documented command reproduces it: seed, data, hyperparameters are all recorded.
    assert args["status"] == "finished"
    assert args["seed"] == 0 and args["arch"] == "base" and args["init"] is None
    assert args["command"].startswith("emotion-worker train --data")
    # Distilled from a teacher that saw the training part only, calibrated on faces that
    # no model trained on, the last epoch kept (the validation split chose nothing).
    assert args["select"] == "last" and args["teacher_epochs"] >= 1
    assert sum(args["counts"]["train"].values()) == args["teacher_summary"]["train_faces"]
    assert 0 < args["calibration"]["temperature"] < 10
    for key in ("epochs", "batch_size", "lr", "weight_decay", "augment", "balance"):
        assert key in args, key
    split = json.loads(files["split.json"].read_text(encoding="utf-8"))
    parts = [set(split[name]) for name in ("train", "val", "calibration")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert sum(map(len, parts)) == 28709
    assert args["teacher_summary"]["train_faces"] == len(split["train"])
    assert args["calibration"]["faces"] == len(split["calibration"])


def test_eval_report_is_of_these_files_and_meets_the_target() -> None:
    report = json.loads((FER_REPORT / "report.json").read_text(encoding="utf-8"))
    # The report names the exact files it evaluated: a retrained model needs a new report.
    assert report["model"]["identity"]["sha256"] == checkpoint_identity(FER_CHECKPOINT)["sha256"]
    assert report["data"]["images"] == len(_val_paths())
    assert report["metrics"]["accuracy"] >= TARGET_ACCURACY
    assert report["metrics"]["macro_f1"] >= TARGET_MACRO_F1
    # Calibrated: dashboards average the scores (the temperature was fitted elsewhere).
    assert report["metrics"]["calibration"]["ece"] <= TARGET_ECE


def test_flip_report_is_of_these_files_and_the_engine_reproduces_it(
    val_faces: list[tuple[Image.Image, str]],
) -> None:
    """The test-time flip's report (make model-eval) names these files and the flip
    setting; the engine with model.tta = flip gives its scores on the committed faces."""
    report = json.loads((FER_FLIP_REPORT / "report.json").read_text(encoding="utf-8"))
    assert report["model"]["identity"]["sha256"] == checkpoint_identity(FER_CHECKPOINT)["sha256"]
    assert report["model"]["settings"]["tta"] == "flip"
    assert report["data"]["images"] == len(_val_paths())
    lines = (FER_FLIP_REPORT / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    reported = {row["path"]: row for row in map(json.loads, lines)}
    flip = EmotionEngine.load(
        ModelSettings(path=FER_CHECKPOINT, device="cpu", tta="flip"), max_batch_size=64
    )
    results = flip.classify([face for face, _ in val_faces])
    same = sum(
        reported[path]["predicted"] == result.label
        for path, result in zip(_committed_paths(), results, strict=True)
    )
    assert same / len(results) >= 0.995, f"{same} of {len(results)} labels agree"


def test_engine_reproduces_the_reported_predictions_of_the_committed_faces(
    engine: EmotionEngine, val_faces: list[tuple[Image.Image, str]]
) -> None:
    """The report's predictions.jsonl has every validation face's scores, made on the full
    FER folder; the committed copies of those faces must score the same through the engine
    today, face by face (so also the report's accuracy on this sample)."""
    lines = (FER_REPORT / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    reported = {row["path"]: row for row in map(json.loads, lines)}
    paths = _committed_paths()
    assert len(paths) == len(val_faces) == 404
    results = engine.classify([face for face, _ in val_faces])
    same_label, worst = 0, 0.0
    for path, result in zip(paths, results, strict=True):
        row = reported[path]
        same_label += row["predicted"] == result.label
        worst = max(worst, *(abs(row["scores"][k] - v) for k, v in result.scores.items()))
    assert same_label / len(paths) >= 0.995, f"{same_label} of {len(paths)} labels agree"
    assert worst < 2e-3
    ours = sum(r.label == truth for r, (_, truth) in zip(results, val_faces, strict=True))
    theirs = sum(reported[path]["predicted"] == reported[path]["true"] for path in paths)
    assert abs(ours - theirs) <= 2
    # Confident answers: far from the tiny model's near-uniform 1/7.
    assert sum(r.confidence for r in results) / len(results) > 0.4


def test_device_pixels_match_the_processor_of_the_shipped_model(
    val_faces: list[tuple[Image.Image, str]],
) -> None:
    from transformers import AutoProcessor

    load: Any = AutoProcessor.from_pretrained
    processor = load(FER_CHECKPOINT, local_files_only=True).image_processor
    faces = [face.convert("RGB") for face, _ in val_faces[:200]]
    faces += [faces[0].resize((96, 80)), faces[1].resize((30, 70))]  # other sizes too
    expected = processor(images=faces, return_tensors="pt")["pixel_values"]
    ours = DevicePreprocessor(
        ProcessorSpec.from_image_processor(processor), torch.device("cpu"), torch.float32
    )(faces)
    level = 1 / 255 / min(processor.image_std)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= 2 * level + 1e-6
    assert (ours - expected).abs().mean().item() < 1e-4


def test_fast_path_matches_the_unbatched_reference_forward(
    engine: EmotionEngine, val_faces: list[tuple[Image.Image, str]]
) -> None:
    """Batched engine (device preprocessing, cached prompt, label rows only) == the
    processor plus a full LlavaForConditionalGeneration forward, one face at a time."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    load: Any = AutoProcessor.from_pretrained
    processor = load(FER_CHECKPOINT, local_files_only=True)
    model: Any = LlavaForConditionalGeneration.from_pretrained(
        FER_CHECKPOINT, local_files_only=True, dtype=torch.float32
    ).eval()
    faces = [face for face, _ in val_faces[::2]]  # 202 faces, every class
    ours = engine.classify(faces)
    label_ids = list(engine.label_token_ids)
    agree, worst = 0, 0.0
    for face, result in zip(faces, ours, strict=True):
        inputs = processor(text=engine.prompt_text, images=face.convert("RGB"), return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        assert logits.shape[1] == inputs["input_ids"].shape[1]  # the whole sequence ran
        reference = logits[0, -1, label_ids].double().softmax(-1).tolist()
        agree += FER_LABELS[max(range(len(FER_LABELS)), key=reference.__getitem__)] == result.label
        worst = max(
            worst, *(abs(a - b) for a, b in zip(reference, result.scores.values(), strict=True))
        )
    assert agree / len(faces) >= 0.995, f"{agree} of {len(faces)} agree"
    assert worst < 0.02


def test_batch_composition_does_not_change_scores(
    engine: EmotionEngine, val_faces: list[tuple[Image.Image, str]]
) -> None:
    faces = [face for face, _ in val_faces[:40]]
    together = engine.classify(faces)
    for face, result in zip(faces[:10], together, strict=False):
        (alone,) = engine.classify([face])
        assert alone.label == result.label
        assert alone.scores == pytest.approx(result.scores, abs=1e-4)
