"""Device preprocessing and the fast path against the plain Hugging Face path.

Reference: the checkpoint's own image processor and an unbatched float32 forward of the
whole LlavaForConditionalGeneration, one image at a time. Tolerances, measured on real FER
faces with the tiny random checkpoint (whose large init makes its scores very sensitive to
pixel noise, so this is a hard case):
- pixel values: every value within 2 uint8 levels (2 / 255 / min(std) = 0.031) of the
  processor's, mean absolute difference below 1e-4 (PIL's two-pass uint8 resize is
  reproduced, so nearly all values are identical);
- labels: the same on at least 99.5% of faces; scores within 0.05 (measured: 99.9%, 0.012).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from consumer.config import DEFAULT_PROMPT, ModelSettings
from consumer.engine import EmotionEngine
from consumer.engine.preprocess import DevicePreprocessor, ProcessorSpec
from consumer.event_source import image_files
from tests.conftest import FER_FACES

LEVEL = 1 / 255 / 0.26130258  # one uint8 level in normalised units (smallest CLIP std)


@pytest.fixture(scope="module")
def many_faces() -> list[Image.Image]:
    return [Image.open(p).convert("L") for p in image_files(FER_FACES, limit=700)]


def _processor(checkpoint: Path) -> Any:
    from transformers import AutoProcessor

    load: Any = AutoProcessor.from_pretrained
    return load(checkpoint, local_files_only=True)


@pytest.mark.parametrize("size", [32, 336])
def test_device_pixels_match_the_processor(
    tiny_checkpoint: Path, many_faces: list[Image.Image], size: int
) -> None:
    from transformers import CLIPImageProcessor

    processor: Any = (
        _processor(tiny_checkpoint).image_processor
        if size == 32
        else CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    )
    faces = [f.convert("RGB") for f in many_faces[: 200 if size == 32 else 20]]
    faces += [faces[0].resize((60, 40)), faces[1].resize((30, 70))]  # not square, smaller
    expected = processor(images=faces, return_tensors="pt")["pixel_values"]
    ours = DevicePreprocessor(
        ProcessorSpec.from_image_processor(processor), torch.device("cpu"), torch.float32
    )(faces)
    difference = (ours - expected).abs()
    assert ours.shape == expected.shape
    assert difference.max().item() <= 2 * LEVEL + 1e-6
    assert difference.mean().item() < 1e-4


def test_fast_path_labels_match_the_reference(
    tiny_checkpoint: Path, many_faces: list[Image.Image]
) -> None:
    from transformers import LlavaForConditionalGeneration

    engine = EmotionEngine.load(
        ModelSettings(path=tiny_checkpoint, device="cpu"), max_batch_size=32
    )
    ours = engine.classify(many_faces)
    processor = _processor(tiny_checkpoint)
    model: Any = LlavaForConditionalGeneration.from_pretrained(
        tiny_checkpoint, local_files_only=True, dtype=torch.float32
    ).eval()
    label_ids = list(engine.label_token_ids)
    agree, worst = 0, 0.0
    for face, result in zip(many_faces, ours, strict=True):
        inputs = processor(text=engine.prompt_text, images=face.convert("RGB"), return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1, label_ids]
        reference = logits.double().softmax(-1).tolist()
        agree += engine.labels[max(range(7), key=reference.__getitem__)] == result.label
        worst = max(
            worst, *(abs(a - b) for a, b in zip(reference, result.scores.values(), strict=True))
        )
    assert agree / len(many_faces) >= 0.995, f"{agree} of {len(many_faces)} agree"
    assert worst < 0.05


def test_labels_sharing_a_first_token_are_scored_as_sequences(
    tiny_checkpoint: Path, many_faces: list[Image.Image]
) -> None:
    """ "happy sad" and "happy angry" start alike: their whole token sequences decide."""
    from transformers import LlavaForConditionalGeneration

    words = ("happy sad", "happy angry", "neutral")
    settings = ModelSettings(
        path=tiny_checkpoint,
        device="cpu",
        preprocess="processor",
        labels=("a", "b", "c"),
        answer_words=words,
    )
    engine = EmotionEngine.load(settings, max_batch_size=4)
    assert not engine._scorer.first_token_only
    faces = many_faces[:5]
    ours = engine.classify(faces)
    processor = _processor(tiny_checkpoint)
    model: Any = LlavaForConditionalGeneration.from_pretrained(
        tiny_checkpoint, local_files_only=True, dtype=torch.float32
    ).eval()
    prompt = DEFAULT_PROMPT.format(labels=", ".join(words))
    prompt_len = processor(text=prompt, images=faces[0].convert("RGB"), return_tensors="pt")[
        "input_ids"
    ].shape[1]
    for face, result in zip(faces, ours, strict=True):
        totals = []
        for word in words:
            inputs = processor(
                text=f"{prompt} {word}", images=face.convert("RGB"), return_tensors="pt"
            )
            ids = inputs["input_ids"][0]
            with torch.no_grad():
                logprobs = model(**inputs).logits[0].double().log_softmax(-1)
            totals.append(
                sum(logprobs[pos - 1, ids[pos]].item() for pos in range(prompt_len, len(ids)))
            )
        expected = torch.tensor(totals).softmax(-1).tolist()
        assert list(result.scores.values()) == pytest.approx(expected, abs=1e-4)


def test_compiled_buckets_match_eager(tiny_checkpoint: Path, many_faces: list[Image.Image]) -> None:
    """compile="on" works on the CPU too, pads batches to its buckets, same scores."""
    eager = EmotionEngine.load(ModelSettings(path=tiny_checkpoint, device="cpu"), max_batch_size=2)
    compiled = EmotionEngine.load(
        ModelSettings(path=tiny_checkpoint, device="cpu", compile="on"), max_batch_size=2
    )
    assert compiled.compiled and compiled.buckets == (1, 2) and eager.buckets == ()
    faces = many_faces[:5]  # batches of 2, 2 and 1
    for a, b in zip(eager.classify(faces), compiled.classify(faces), strict=True):
        assert a.label == b.label
        assert list(a.scores.values()) == pytest.approx(list(b.scores.values()), abs=1e-5)


def test_compile_auto_is_off_on_cpu_and_fp8_refused(tiny_checkpoint: Path) -> None:
    from consumer.engine import ModelLoadError

    engine = EmotionEngine.load(ModelSettings(path=tiny_checkpoint, device="cpu"))
    assert not engine.compiled
    with pytest.raises(ModelLoadError, match=r"compute capability 8\.9"):
        EmotionEngine.load(ModelSettings(path=tiny_checkpoint, device="cpu", precision="fp8"))


def test_vision_tower_stops_at_the_feature_layer(tiny_checkpoint: Path) -> None:
    engine = EmotionEngine.load(ModelSettings(path=tiny_checkpoint, device="cpu"))
    layers = engine.model.model.vision_tower
    layers = getattr(layers, "vision_model", layers).encoder.layers
    assert engine.model.config.vision_feature_layer == -2
    assert len(layers) == engine.model.config.vision_config.num_hidden_layers - 1


def test_two_engines_over_one_model(tiny_checkpoint: Path, many_faces: list[Image.Image]) -> None:
    from consumer.engine.loader import load_checkpoint

    settings = ModelSettings(path=tiny_checkpoint, device="cpu")
    checkpoint = load_checkpoint(settings)
    first = EmotionEngine(checkpoint, settings)
    second = EmotionEngine(checkpoint, settings)  # the vision tower is cut only once
    a, b = first.classify(many_faces[:3]), second.classify(many_faces[:3])
    assert [x.scores for x in a] == [y.scores for y in b]
