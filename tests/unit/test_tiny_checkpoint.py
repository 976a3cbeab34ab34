"""The tiny random LLaVA checkpoint: layout, determinism, idempotence."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from consumer.config import ModelSettings
from consumer.engine import EmotionEngine, make_tiny_checkpoint
from consumer.engine.tiny import MARKER

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_layout_matches_a_hugging_face_llava_checkpoint(tiny_checkpoint: Path) -> None:
    names = {item.name for item in tiny_checkpoint.iterdir()}
    expected = {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "processor_config.json",
        "README.md",
        MARKER,
    }
    assert expected <= names
    assert not [name for name in names if name.endswith((".bin", ".pt", ".pth"))]
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "llava"
    assert config["vision_feature_layer"] == -2
    assert config["vision_feature_select_strategy"] == "default"
    size = sum(item.stat().st_size for item in tiny_checkpoint.iterdir())
    assert size < 3 * 1024 * 1024
    assert "random" in (tiny_checkpoint / "README.md").read_text()


def test_engine_loads_it_as_llava(tiny_checkpoint: Path) -> None:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    engine = EmotionEngine.load(ModelSettings(path=tiny_checkpoint, device="cpu"))
    assert isinstance(engine.model, LlavaForConditionalGeneration)
    assert engine.device == torch.device("cpu")
    assert engine.model.dtype == torch.float32
    assert not engine.model.training
    # The processor saved with it expands <image> into one token per 8x8 patch of 32x32.
    from transformers import AutoProcessor

    load_processor: Any = AutoProcessor.from_pretrained  # transformers' loaders are untyped
    processor = load_processor(tiny_checkpoint, local_files_only=True)
    assert isinstance(processor, LlavaProcessor)
    assert engine.image_tokens == 16


def test_tokenizer_handles_any_text(tiny_checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint, local_files_only=True)
    ids = tokenizer("Ünïcode 🙂 words?! happy <image>")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<s>"
    assert "<unk>" in tokens
    assert tokens[-2:] == ["happy", "<image>"]
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "</s>"


def test_same_seed_same_weights_other_seed_other_weights(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    again = make_tiny_checkpoint(tmp_path / "again", seed=0)
    other = make_tiny_checkpoint(tmp_path / "other", seed=1)
    reference, same, different = _weights(tiny_checkpoint), _weights(again), _weights(other)
    assert reference.keys() == same.keys() == different.keys()
    assert all(torch.equal(reference[name], same[name]) for name in reference)
    assert not all(torch.equal(reference[name], different[name]) for name in reference)


def test_second_call_is_a_no_op(tiny_checkpoint: Path) -> None:
    before = {item.name: item.stat().st_mtime_ns for item in tiny_checkpoint.iterdir()}
    assert make_tiny_checkpoint(tiny_checkpoint, seed=0) == tiny_checkpoint
    after = {item.name: item.stat().st_mtime_ns for item in tiny_checkpoint.iterdir()}
    assert after == before


def test_half_written_folder_is_completed(tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text("{truncated")
    make_tiny_checkpoint(folder, seed=0)
    assert (folder / MARKER).is_file()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llava"
    assert not [item for item in tmp_path.iterdir() if item.name != "tiny"]  # staging removed


def test_image_size_must_fit_the_patches(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        make_tiny_checkpoint(tmp_path / "odd", image_size=30)
