"""The model card `emotion-worker train` writes (README.md): Hugging Face metadata, the
intended use, no paths of the training machine, and the shipped card is the generator's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from consumer.config import DEFAULT_PROMPT, FER_LABELS
from consumer.training.config import TrainConfig
from consumer.training.model_card import render_model_card, write_model_card_from_records
from tests.conftest import FER_CHECKPOINT, REPO

RECORDS = ("training_args.json", "train_log.jsonl", "eval_report.json")


def _front_matter(card: str) -> str:
    assert card.startswith("---\n"), card[:80]
    header, sep, _ = card[4:].partition("\n---\n")
    assert sep, "the front matter is not closed by a --- line"
    return header


def _top_level(header: str) -> dict[str, str]:
    """key -> rest of line, for the unindented `key: value` / `key:` lines (YAML-ish)."""
    keys: dict[str, str] = {}
    for line in header.splitlines():
        if not line.strip() or line.startswith(("#", " ", "-")):
            continue
        key, sep, value = line.partition(":")
        assert sep and key.strip() == key and " " not in key, f"not a key: value line: {line!r}"
        keys[key] = value.strip()
    return keys


def _run(tmp_path: Path, init: Path | None = None) -> dict[str, Any]:
    """A finished run's inputs to the card, trained in tmp_path on data outside the repo."""
    data = tmp_path / "datasets" / "fer2013" / "train"
    out = tmp_path / "runs" / "my-model"
    command = f"emotion-worker train --data {data} --out={out} --epochs 2 --seed 1"
    if init is not None:
        command += f" --init {init} --lora"
    config = TrainConfig(
        data=data,
        out=out,
        labels=FER_LABELS,
        prompt=DEFAULT_PROMPT,
        init=init,
        lora=init is not None,
        epochs=2,
        seed=1,
        command=command,
    )
    counts = {label: 10 + i for i, label in enumerate(FER_LABELS)}
    args = {
        "threads_used": 2,
        "device_used": "cpu",
        "parameters": 412416,
        "counts": {"all": counts},
    }
    history = [
        {
            "epoch": epoch,
            "train_loss": 1.5,
            "train_accuracy": 0.4,
            "val_accuracy": 0.3 + epoch / 10,
            "val_macro_f1": 0.2 + epoch / 10,
        }
        for epoch in (1, 2)
    ]
    per_class = {
        label: {"precision": 0.5, "recall": 0.5, "f1": 0.5 - i / 100, "support": 3}
        for i, label in enumerate(FER_LABELS)
    }
    report = {
        "images": 21,
        "accuracy": 0.5238,
        "macro_f1": 0.4712,
        "per_class": per_class,
        "engine_images_per_s": 900.0,
        "engine_batch_size": 64,
        "threads": 2,
    }
    text = render_model_card(out.name, config, args, history, history[1], report, 61.0)
    return {"card": text, "data": data, "out": out, "tmp": tmp_path}


def test_card_has_hugging_face_metadata(tmp_path: Path) -> None:
    card = _run(tmp_path)["card"]
    header = _front_matter(card)
    keys = _top_level(header)
    assert keys["license"] == "apache-2.0"
    assert keys["pipeline_tag"] == "image-text-to-text"
    assert keys["library_name"] == "transformers"
    assert {"datasets", "tags", "model-index"} <= set(keys)
    assert "- fer2013" in header.split("datasets:")[1].split("\n")[1]
    assert "base_model" not in keys  # trained from scratch: there is no base model
    assert "trained from scratch" in header
    # The real YAML parser (PyYAML comes with transformers) reads the same.
    yaml = pytest.importorskip("yaml")
    meta = yaml.safe_load(header)
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["fer2013"]
    assert "emotion-recognition" in meta["tags"]
    [entry] = meta["model-index"]
    assert entry["name"] == "my-model"
    [result] = entry["results"]
    assert result["dataset"]["type"] == "fer2013" and result["dataset"]["split"] == "validation"
    metrics = {m["type"]: m for m in result["metrics"]}
    assert metrics["accuracy"]["value"] == 0.5238
    assert metrics["f1"]["value"] == 0.4712 and metrics["f1"]["args"] == {"average": "macro"}


def test_card_names_no_path_of_the_training_machine(tmp_path: Path) -> None:
    run = _run(tmp_path)
    card = run["card"]
    for path in (run["data"], run["out"], run["tmp"]):
        assert str(path) not in card
    assert str(REPO) not in card
    # The command stays a command: portable --data and --out, every other flag as it was.
    assert (
        "emotion-worker train --data <FER-2013 train folder> --out=models/my-model --epochs 2 "
        "--seed 1" in card
    )
    assert "emotion-detection-fer" in card
    assert "Data: `<FER-2013 train folder>`" in card


def test_card_of_a_fine_tune_names_its_base_model_not_its_path(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--llava-hf--llava-1.5-7b-hf" / "snapshots" / "0123abc"
    card = _run(tmp_path, init=snapshot)["card"]
    keys = _top_level(_front_matter(card))
    assert keys["base_model"] == "llava-hf/llava-1.5-7b-hf"
    assert str(snapshot) not in card and str(tmp_path) not in card
    assert "--init llava-hf/llava-1.5-7b-hf --lora" in card
    assert "Fine-tuned from `llava-hf/llava-1.5-7b-hf` with LoRA" in card


def test_card_states_intended_use_and_limitations(tmp_path: Path) -> None:
    card = _run(tmp_path)["card"]
    assert "## Intended use" in card and "## Limitations" in card
    intended = card.split("## Intended use")[1].split("## Limitations")[0]
    assert "biometric" in intended and "EU AI Act" in intended
    assert "workplace" in intended and "education" in intended
    assert "medical or safety" in intended
    for use in ("aggregate", "consent", "research", "demo"):
        assert use in intended, use
    for misuse in (
        "hiring",
        "grading",
        "policing",
        "surveillance",
        "insurance",
        "credit",
        "inner states",
        "children",
        "without notice or consent",
    ):
        assert misuse in intended, misuse
    limitations = card.split("## Limitations")[1].split("\n## ")[0]
    for point in ("48x48", "noisy", "Demographic skew is not measured"):
        assert point in limitations, point
    assert "FER-2013's terms" in card  # the data's own terms, beside the weights' licence


def test_shipped_card_is_the_generators_from_the_run_records(tmp_path: Path) -> None:
    """models/llava-fer-small/README.md is exactly what write_model_card_from_records makes
    of the folder's records: the card cannot drift from the generator (or be hand-edited)."""
    folder = tmp_path / FER_CHECKPOINT.name
    folder.mkdir()
    for name in RECORDS:
        shutil.copy(FER_CHECKPOINT / name, folder / name)
    written = write_model_card_from_records(folder).read_text(encoding="utf-8")
    shipped = (FER_CHECKPOINT / "README.md").read_text(encoding="utf-8")
    assert written == shipped
    # training_args.json stays the faithful record of the run, paths included; the card
    # repeats none of them.
    args = json.loads((FER_CHECKPOINT / "training_args.json").read_text(encoding="utf-8"))
    for path in (args["data"], args["out"]):
        assert Path(path).is_absolute() and path not in shipped
    assert "make model FER=<folder>" in shipped
