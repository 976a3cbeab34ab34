"""How a run measures its model: label scores through the engine's `LabelHead` during
training (`predict`, each epoch), and the saved folder through the worker's own
EmotionEngine at the end (`evaluate_checkpoint`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from consumer.engine.fastpath import LabelHead
from consumer.training.dataset import Example, Normalizer
from consumer.training.metrics import classification_report
from consumer.training.model import AnswerFormat


def prompt_embeddings(model: Any, fmt: AnswerFormat, pixels: torch.Tensor) -> torch.Tensor:
    """(B, T, D): the prompt's token embeddings with each image's features at its image
    tokens, built the way LlavaModel.forward builds them.

    The engine instead caches the text embeddings and cuts the vision tower after the
    feature layer; a model being trained keeps its whole tower (it is saved as it is), so
    the features come from `get_image_features`, which reads the configured layer.
    """
    ids, _ = fmt.prompt_batch(pixels.shape[0])
    ids = ids.to(pixels.device)
    embeds: torch.Tensor = model.get_input_embeddings()(ids)
    config = model.config
    image_outputs = model.model.get_image_features(
        pixel_values=pixels,
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        return_dict=True,
    )
    # One (tokens, D) tensor per image, in batch order: they fill the image tokens row by row.
    features = torch.cat(list(image_outputs.pooler_output), dim=0).to(embeds.device, embeds.dtype)
    mask = (ids == config.image_token_id).unsqueeze(-1)
    spliced: torch.Tensor = embeds.masked_scatter(mask, features)
    return spliced


def label_scores(
    model: Any, fmt: AnswerFormat, pixels: torch.Tensor, *, head: LabelHead | None = None
) -> torch.Tensor:
    """(B, L) label log-scores of normalised pixel values: the engine's `LabelHead` over
    this model's prompt embeddings. Gradients flow unless the caller turns them off.

    `head` (the label rows of lm_head) may be built once by a caller scoring many batches
    with unchanged weights.
    """
    head = head if head is not None else LabelHead(model, fmt.sequences)
    return head.scores(model, prompt_embeddings(model, fmt, pixels))


@torch.no_grad()
def predict_logits(
    model: Any,
    fmt: AnswerFormat,
    images: torch.Tensor,
    normalize: Normalizer,
    *,
    batch_size: int,
    device: torch.device,
    autocast: bool = False,
) -> torch.Tensor:
    """float32 label scores (N, labels) on the CPU per uint8 image, as the engine scores labels.

    With distinct first answer tokens (a word-level tokenizer, or most BPE vocabularies),
    one pass over the prompt and the next-token logits of those tokens; otherwise the
    summed log-probability of each label's whole answer, all labels in one batched pass.
    """
    was_training = model.training
    model.eval()
    head = LabelHead(model, fmt.sequences)
    # Sequence scoring runs images x labels sequences at once: fewer images per batch keep
    # that pass at batch_size sequences.
    step = batch_size if head.first_token_only else max(1, batch_size // len(head.sequences))
    scores: list[torch.Tensor] = []
    for start in range(0, images.shape[0], step):
        pixels = normalize(images[start : start + step]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            scores.append(label_scores(model, fmt, pixels, head=head).float().cpu())
    model.train(was_training)
    return torch.cat(scores) if scores else torch.empty(0, len(fmt.sequences))


def predict(
    model: Any,
    fmt: AnswerFormat,
    images: torch.Tensor,
    normalize: Normalizer,
    *,
    batch_size: int,
    device: torch.device,
    autocast: bool = False,
) -> torch.Tensor:
    """Predicted label index per uint8 image (the argmax of `predict_logits`)."""
    logits = predict_logits(
        model, fmt, images, normalize, batch_size=batch_size, device=device, autocast=autocast
    )
    return logits.argmax(dim=1) if logits.numel() else torch.empty(0, dtype=torch.long)


def evaluate_checkpoint(
    path: Path,
    data: Path,
    examples: Sequence[Example],
    labels: Sequence[str],
    prompt: str,
    *,
    device: str = "cpu",
    batch_size: int = 64,
) -> dict[str, Any]:
    """Classify `examples` with the worker's EmotionEngine loading `path`; a report dict.

    This is the check that the saved folder, loaded by the worker exactly as in production
    (validation, processor, label scoring), reproduces the training-time validation score.
    """
    from PIL import Image

    from consumer.config import ModelSettings
    from consumer.engine import EmotionEngine

    settings = ModelSettings(
        path=path,
        labels=tuple(labels),
        prompt=prompt,
        device=device,  # type: ignore[arg-type]
        compile="off",
    )
    engine = EmotionEngine.load(settings, max_batch_size=batch_size)
    faces = []
    for example in examples:
        with Image.open(data / example.path) as image:
            image.load()
            faces.append(image.copy())
    engine.classify(faces[:batch_size])  # warm-up, not timed
    began = time.perf_counter()
    results = engine.classify(faces)
    seconds = time.perf_counter() - began
    index = {label: i for i, label in enumerate(labels)}
    predicted = [index[result.label] for result in results]
    report = classification_report([e.label for e in examples], predicted, labels)
    report["split"] = "val"
    report["engine_images_per_s"] = round(len(faces) / seconds, 1) if seconds else 0.0
    report["engine_batch_size"] = batch_size
    report["threads"] = torch.get_num_threads()
    return report
