"""EmotionEngine on the tiny checkpoint, and the loader's refusals."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from consumer.config import DEFAULT_PROMPT, FER_LABELS, ModelSettings
from consumer.engine import EmotionEngine, FaceScores, ModelLoadError
from consumer.engine.loader import resolve_device, resolve_dtype
from consumer.engine.scoring import label_token_ids

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> EmotionEngine:
    """Small batches so the FER faces span several chunks."""
    return EmotionEngine.load(ModelSettings(path=tiny_checkpoint, device="cpu"), max_batch_size=4)


@pytest.fixture(scope="module")
def faces(fer_faces: list[tuple[Path, str]]) -> list[Image.Image]:
    images = []
    for path, _ in fer_faces:
        with Image.open(path) as image:
            images.append(image.copy())
    assert {image.mode for image in images} == {"L"}
    return images


def _check(result: FaceScores) -> None:
    assert set(result.scores) == set(FER_LABELS)
    assert math.isclose(sum(result.scores.values()), 1.0, abs_tol=1e-5)
    assert result.label == max(result.scores, key=result.scores.__getitem__)
    assert result.confidence == max(result.scores.values())


def test_classifies_fer_faces(engine: EmotionEngine, faces: list[Image.Image]) -> None:
    results = engine.classify(faces)
    assert len(results) == len(faces) == 14
    for result in results:
        _check(result)
    # Random weights, but the image must still change the answer.
    assert len({round(result.confidence, 6) for result in results}) > 1


def test_mixed_modes_and_sizes(engine: EmotionEngine, faces: list[Image.Image]) -> None:
    base = faces[0]
    mixed = [
        base,
        base.convert("RGB"),
        base.convert("RGBA"),
        base.convert("P"),
        base.convert("RGB").resize((200, 120)),
        base.convert("RGBA").resize((17, 64)),
        Image.new("RGB", (640, 480), (10, 200, 30)),
    ]
    results = engine.classify(mixed)
    assert len(results) == len(mixed)
    for result in results:
        _check(result)
    # The same grey pixels in another mode give the same scores.
    for same_pixels in results[1:4]:
        assert same_pixels.scores == pytest.approx(results[0].scores, abs=1e-4)


def test_chunked_batch_equals_single_calls(engine: EmotionEngine, faces: list[Image.Image]) -> None:
    assert len(faces) > engine.max_batch_size
    batched = engine.classify(faces)
    for face, result in zip(faces, batched, strict=True):
        (single,) = engine.classify([face])
        assert single.label == result.label
        assert single.scores == pytest.approx(result.scores, abs=1e-4)


def test_empty_input(engine: EmotionEngine) -> None:
    assert engine.classify([]) == []


def test_warm_up_and_metadata(engine: EmotionEngine) -> None:
    engine.warm_up()
    assert engine.labels == FER_LABELS
    assert engine.model_id == "tiny-llava"
    assert engine.device == torch.device("cpu")


def test_device_and_dtype_choice() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)


def test_rejects_non_images(engine: EmotionEngine) -> None:
    with pytest.raises(TypeError, match="PIL images"):
        engine.classify([b"not an image"])  # type: ignore[list-item]


def test_one_pass_matches_full_processor_forward(
    tiny_checkpoint: Path, faces: list[Image.Image]
) -> None:
    """The fast path (cached prompt embeddings, truncated vision tower, label rows of
    lm_head only) == processor(text, images) + the full Hugging Face forward.

    The checkpoint's own image processor is used on both sides here, so that this test
    pins the model math; tests/unit/test_preprocess.py covers device preprocessing.
    """
    engine = EmotionEngine.load(
        ModelSettings(path=tiny_checkpoint, device="cpu", preprocess="processor"),
        max_batch_size=4,
    )
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    load_processor: Any = AutoProcessor.from_pretrained  # transformers' loaders are untyped
    processor = load_processor(tiny_checkpoint, local_files_only=True)
    model: Any = LlavaForConditionalGeneration.from_pretrained(
        tiny_checkpoint, local_files_only=True, dtype=torch.float32
    )
    model.eval()
    prompt = DEFAULT_PROMPT.format(labels=", ".join(FER_LABELS))
    # In the tiny vocabulary every label is one word token.
    label_ids = processor.tokenizer.convert_tokens_to_ids(list(FER_LABELS))
    ours = engine.classify(faces[:3])
    for face, result in zip(faces[:3], ours, strict=True):
        inputs = processor(text=prompt, images=face.convert("RGB"), return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        assert logits.shape[1] == inputs["input_ids"].shape[1]  # really the full sequence
        expected = logits[0, -1, label_ids].double().softmax(-1).tolist()
        assert list(result.scores.values()) == pytest.approx(expected, abs=1e-4)


def test_answer_words_name_labels(tiny_checkpoint: Path, faces: list[Image.Image]) -> None:
    settings = ModelSettings(
        path=tiny_checkpoint,
        device="cpu",
        labels=("positive", "negative"),
        answer_words=("happy", "sad"),
        model_id="tiny-test",
    )
    engine = EmotionEngine.load(settings)
    (result,) = engine.classify(faces[:1])
    assert set(result.scores) == {"positive", "negative"}
    assert engine.model_id == "tiny-test"
    assert "happy, sad" in engine.prompt_text


# --- loader refusals -------------------------------------------------------------------


def _load_error(path: Path, **settings: Any) -> str:
    with pytest.raises(ModelLoadError) as caught:
        EmotionEngine.load(ModelSettings(path=path, device="cpu", **settings))
    return str(caught.value)


def _copy_without(source: Path, target: Path, *names: str) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*names))
    return target


def test_missing_folder(tmp_path: Path) -> None:
    message = _load_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "does not exist" in message


def test_missing_config(tmp_path: Path) -> None:
    message = _load_error(tmp_path)
    assert "no config.json" in message and str(tmp_path) in message


def test_not_llava(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    message = _load_error(tmp_path)
    assert "'llama'" in message and "expected 'llava'" in message


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    message = _load_error(tmp_path)
    assert "pytorch_model.bin" in message and "convert to safetensors" in message


def test_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert "no *.safetensors" in _load_error(tmp_path)


def test_missing_tokenizer(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy_without(tiny_checkpoint, tmp_path / "ck", "tokenizer.json")
    message = _load_error(folder)
    assert "no tokenizer files" in message and str(folder) in message


def test_missing_processor(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy_without(
        tiny_checkpoint, tmp_path / "ck", "preprocessor_config.json", "processor_config.json"
    )
    assert "preprocessor_config.json" in _load_error(folder)


def test_incomplete_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy_without(tiny_checkpoint, tmp_path / "ck")
    weights = load_file(folder / "model.safetensors")
    dropped = next(name for name in weights if "lm_head" in name)
    del weights[dropped]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    message = _load_error(folder)
    assert "lacks weights" in message and "lm_head" in message


def test_cuda_without_gpu(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        EmotionEngine.load(ModelSettings(path=tiny_checkpoint, device="cuda"))


def test_duplicate_answer_words(tiny_checkpoint: Path) -> None:
    words = ("happy", "happy", "fearful", "angry", "neutral", "sad", "surprised")
    message = _load_error(tiny_checkpoint, answer_words=words)
    assert "'angry' and 'disgusted' have the same tokens" in message
    assert "distinct model.answer_words" in message


def test_unknown_words_collide_on_unk(tiny_checkpoint: Path) -> None:
    words = ("zorn", "ekel", "angst", "freude", "ruhe", "trauer", "staunen")
    message = _load_error(tiny_checkpoint, answer_words=words)
    assert "'zorn' is unknown to the tokenizer" in message


def test_single_unknown_word(tiny_checkpoint: Path) -> None:
    words = ("furious", *FER_LABELS[1:])
    assert "unknown to the tokenizer" in _load_error(tiny_checkpoint, answer_words=words)


def test_label_token_follows_the_prompt_for_sentencepiece_style_tokenizers() -> None:
    """With a Metaspace tokenizer " happy" is "▁happy", not the bare "happy" token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    prompt = "USER: <image> Which one? ASSISTANT:"
    splitter = pre_tokenizers.Metaspace(prepend_scheme="first")
    pieces = [piece for piece, _ in splitter.pre_tokenize_str(prompt + " happy sad")]
    vocab = {token: i for i, token in enumerate(["<unk>", "<image>", "happy", "sad", *pieces])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = splitter
    backend.add_special_tokens(["<unk>", "<image>"])
    tokenizer_class: Any = PreTrainedTokenizerFast  # its __init__ is untyped
    tokenizer = tokenizer_class(tokenizer_object=backend, unk_token="<unk>")
    ids = label_token_ids(tokenizer, prompt, ("happy", "sad"), ("happy", "sad"))
    assert ids == [vocab["▁happy"], vocab["▁sad"]]
