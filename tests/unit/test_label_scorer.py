"""One label scorer: the engine's `LabelHead` serves the worker and measures training.

Serving (EmotionEngine: cached prompt embeddings, cut vision tower, inference mode) and
training (the whole model, live weights, gradients) build the prompt embeddings each their
own way and score labels with the same code, so the two must agree exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (torch's convention)

from consumer.config import DEFAULT_PROMPT, FER_LABELS, ModelSettings
from consumer.engine import EmotionEngine
from consumer.training.dataset import Example, Normalizer, load_pixels, scan_folder
from consumer.training.model import (
    ARCHS,
    AnswerFormat,
    build_scratch_model,
    load_init_model,
)
from consumer.training.validation import label_scores, predict
from tests.conftest import FER_FACES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU = torch.device("cpu")
# Word-level answers: distinct first tokens (one pass), or a shared first token ("happy"),
# which makes both sides score whole token sequences.
ANSWERS = {
    "first token": (FER_LABELS, FER_LABELS),
    "sequences": (("a", "b", "c"), ("happy sad", "happy angry", "neutral")),
}


def _faces(size: int, per_class: int = 2) -> torch.Tensor:
    """uint8 pixels (N, 1, size, size) of the first FER faces of every class."""
    examples = scan_folder(FER_FACES, FER_LABELS)
    picked: list[Example] = []
    for label in range(len(FER_LABELS)):
        picked.extend([e for e in examples if e.label == label][:per_class])
    return load_pixels(FER_FACES, picked, size)


def _answer_format(processor: Any, model: Any, answers: str, size: int) -> AnswerFormat:
    labels, words = ANSWERS[answers]
    prompt = DEFAULT_PROMPT.format(labels=", ".join(words))
    return AnswerFormat.build(processor, model.config, prompt, labels, words, size)


@pytest.mark.parametrize("answers", list(ANSWERS))
def test_training_and_the_engine_give_the_same_label_scores(
    tiny_checkpoint: Path, answers: str
) -> None:
    labels, words = ANSWERS[answers]
    engine = EmotionEngine.load(
        ModelSettings(path=tiny_checkpoint, device="cpu", labels=labels, answer_words=words)
    )
    assert engine._scorer.first_token_only is (answers == "first token")
    model, processor, _ = load_init_model(tiny_checkpoint, "cpu")  # a second, uncut copy
    model.eval()
    image_processor = processor.image_processor
    size = int(image_processor.crop_size["height"])
    fmt = _answer_format(processor, model, answers, size)
    assert [list(seq) for seq in fmt.sequences] == engine.label_sequences
    normalize = Normalizer(size, tuple(image_processor.image_mean), image_processor.image_std)
    pixels = _faces(size)
    values = normalize(pixels)
    with torch.no_grad():
        trained = label_scores(model, fmt, values)
    with torch.inference_mode():
        served = engine._scorer(values)
    assert trained.shape == (values.shape[0], len(labels)) and trained.dtype == torch.float32
    # Same scoring code on embeddings built two ways (cached prefix and cut tower vs the
    # whole model): bit for bit the same numbers.
    assert torch.equal(trained, served)
    # Sequence scoring batches faces x labels; predict keeps that at batch_size sequences.
    predicted = predict(model, fmt, pixels, normalize, batch_size=4, device=CPU)
    assert predicted.tolist() == served.argmax(dim=1).tolist()
    # The tiny checkpoint reads vision layer -2: training must keep (and save) its whole
    # tower, unlike the engine, which cuts its own copy.
    layers = model.model.vision_tower.encoder.layers
    assert len(layers) == model.config.vision_config.num_hidden_layers
    assert len(engine.model.model.vision_tower.encoder.layers) == len(layers) - 1


@pytest.mark.parametrize("answers", list(ANSWERS))
def test_label_scores_carry_gradients_to_the_live_weights(answers: str) -> None:
    model, processor = build_scratch_model(
        ARCHS["tiny"], image_size=48, labels=FER_LABELS, prompt=DEFAULT_PROMPT, seed=0
    )
    fmt = _answer_format(processor, model, answers, 48)
    image_processor = processor.image_processor
    normalize = Normalizer(48, tuple(image_processor.image_mean), image_processor.image_std)
    values = normalize(_faces(48, per_class=1))
    scores = label_scores(model, fmt, values)
    assert scores.requires_grad  # the scorer itself never turns gradients off
    targets = torch.arange(values.shape[0]) % len(fmt.sequences)
    F.cross_entropy(scores, targets).backward()  # type: ignore[no-untyped-call]
    head_grad = model.lm_head.weight.grad
    assert head_grad is not None
    touched = set(head_grad.abs().sum(dim=1).nonzero().flatten().tolist())
    if answers == "first token":
        # One pass reads only the label rows of lm_head, still linked to it (no detached copy).
        assert touched == set(fmt.first_tokens)
    else:
        # Sequence scoring normalises over the whole vocabulary at every answer position.
        assert set(fmt.first_tokens) < touched
    patch = model.model.vision_tower.embeddings.patch_embedding.weight.grad
    assert patch is not None and bool(patch.abs().sum() > 0)
