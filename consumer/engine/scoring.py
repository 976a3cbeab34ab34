"""Score faces with one LLaVA forward pass: the next-token probabilities of the answer words."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from consumer.config import ModelSettings
from consumer.engine.fastpath import LabelScorer
from consumer.engine.loader import LoadedCheckpoint, ModelLoadError, load_checkpoint
from consumer.engine.precision import choose_precision
from consumer.engine.preprocess import DevicePreprocessor, ProcessorSpec, as_rgb


@dataclass(frozen=True, slots=True)
class FaceScores:
    """One face's result: the best label, its probability, and every label's probability."""

    label: str
    confidence: float
    scores: dict[str, float]


@dataclass(frozen=True, slots=True)
class _Prompt:
    """The prompt tokenized once, with <image> already expanded to the image token count."""

    input_ids: torch.Tensor  # (1, sequence) on the model's device
    attention_mask: torch.Tensor  # (1, sequence)
    pixel_shape: tuple[int, ...]  # (channels, height, width) these ids were built for
    image_tokens: int


class EmotionEngine:
    """A loaded LLaVA that names the expression of face crops; use from one thread."""

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        settings: ModelSettings,
        *,
        max_batch_size: int = 16,
    ) -> None:
        """Prepare the cached prompt, label tokens and fast path; prefer EmotionEngine.load()."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.labels: tuple[str, ...] = settings.labels
        self.model_id: str = settings.model_id or checkpoint.path.name
        self.device: torch.device = checkpoint.device
        self.dtype: torch.dtype = checkpoint.dtype
        self.max_batch_size = max_batch_size
        self.views = 2 if settings.tta == "flip" else 1  # forward rows per face
        self.model: Any = checkpoint.model
        self._image_processor: Any = checkpoint.processor.image_processor
        words = settings.words
        self.prompt_text: str = settings.prompt.format(labels=", ".join(words))
        self._prompt = _encode_prompt(checkpoint, self.prompt_text)
        self.label_sequences = label_sequences(
            checkpoint.processor.tokenizer, self.prompt_text, settings.labels, words
        )
        self.label_token_ids: tuple[int, ...] = tuple(seq[0] for seq in self.label_sequences)
        self._device_preprocess = (
            DevicePreprocessor(
                ProcessorSpec.from_image_processor(self._image_processor), self.device, self.dtype
            )
            if settings.preprocess == "device"
            else None
        )
        self._scorer = LabelScorer(self.model, self._prompt.input_ids, self.label_sequences)
        # After the scorer (its calibration forward is the scorer's own, unquantized) and
        # before torch.compile (which must trace the quantized layers).
        choice, self.quantized_layers = choose_precision(
            self.model,
            settings.precision,
            self.device,
            calibrate=self._calibrate,
            rows=max_batch_size * self.views * int(self._prompt.input_ids.shape[1]),
        )
        # What the language model's linear layers run: "none" (model.dtype), "fp8", "int8".
        self.precision: str = choice.precision
        self.precision_reason: str = choice.reason
        self.compiled = settings.compile == "on" or (
            settings.compile == "auto" and self.device.type == "cuda"
        )
        # Compiled code is specialised per shape: batches are padded up to a few buckets.
        self.buckets: tuple[int, ...] = _buckets(max_batch_size) if self.compiled else ()
        self._forward: Any = (
            torch.compile(self._scorer, dynamic=False) if self.compiled else self._scorer
        )

    @classmethod
    def load(cls, settings: ModelSettings, *, max_batch_size: int = 16) -> EmotionEngine:
        """Validate and load settings.path; raise ModelLoadError naming the problem and the fix."""
        return cls(load_checkpoint(settings), settings, max_batch_size=max_batch_size)

    @property
    def image_tokens(self) -> int:
        """How many <image> tokens one face takes in the prompt."""
        return self._prompt.image_tokens

    def warm_up(self) -> None:
        """Run every batch shape once so kernels (and compiled graphs) are ready."""
        height, width = self._prompt.pixel_shape[-2:]
        blank = Image.new("RGB", (width, height), (128, 128, 128))
        for size in self.buckets or (self.max_batch_size,):
            self.classify([blank] * size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _calibrate(self) -> None:
        """One unquantized forward over a few synthetic faces: the activations int8 records
        (SmoothQuant statistics, the fidelity check). Grey like warm_up's, plus seeded noise
        so the image tokens cover a wider range than a flat image gives; the prompt's text
        tokens are the real ones."""
        height, width = self._prompt.pixel_shape[-2:]
        generator = torch.Generator().manual_seed(0)
        faces = [Image.new("RGB", (width, height), (128, 128, 128))]
        for _ in range(3):
            noise = torch.randint(0, 256, (height, width, 3), generator=generator)
            faces.append(Image.fromarray(noise.to(torch.uint8).numpy(), "RGB"))
        with torch.inference_mode():
            self._scorer(self._pixel_values(faces))

    def classify(self, faces: Sequence[Image.Image]) -> list[FaceScores]:
        """One FaceScores per face, in order; batches of at most max_batch_size."""
        results: list[FaceScores] = []
        for start in range(0, len(faces), self.max_batch_size):
            chunk = faces[start : start + self.max_batch_size]
            probabilities = self._probabilities(chunk).tolist()
            results.extend(self._to_scores(row) for row in probabilities)
        return results

    def _probabilities(self, faces: Sequence[Image.Image]) -> torch.Tensor:
        """(faces, labels) float64 probabilities on the CPU."""
        pixel_values = self._pixel_values(faces)
        count = pixel_values.shape[0]
        bucket = next((b for b in self.buckets if b >= count), count)
        if bucket > count:  # repeat a real face: padding rows are computed, then dropped
            pad = pixel_values[:1].expand(bucket - count, -1, -1, -1)
            pixel_values = torch.cat([pixel_values, pad])
        rows = pixel_values.shape[0]
        if self.views == 2:  # model.tta = "flip": the mirrored faces ride in the same pass
            pixel_values = torch.cat([pixel_values, pixel_values.flip(-1)])
        with torch.inference_mode():
            # float64 so the probabilities sum to 1 within 1e-9 even from bfloat16 logits.
            views = self._forward(pixel_values).double().softmax(dim=-1)
            if self.views == 2:
                views = (views[:rows] + views[rows:]) / 2
            probabilities: torch.Tensor = views[:count].cpu()
            return probabilities

    def _pixel_values(self, faces: Sequence[Image.Image]) -> torch.Tensor:
        if self._device_preprocess is not None:
            pixel_values = self._device_preprocess(faces)
        else:
            rgb = [as_rgb(face) for face in faces]
            pixel_values = self._image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        if tuple(pixel_values.shape[1:]) != self._prompt.pixel_shape:
            # The cached prompt holds a fixed number of image tokens; another image size
            # would need another count, which a fixed-size (center-crop) processor never makes.
            raise RuntimeError(
                f"preprocessing made pixel_values of shape {tuple(pixel_values.shape[1:])}, "
                f"but the prompt was built for {self._prompt.pixel_shape}"
            )
        return pixel_values.to(self.device, dtype=self.dtype, non_blocking=True)

    def _to_scores(self, row: list[float]) -> FaceScores:
        best = max(range(len(row)), key=row.__getitem__)
        return FaceScores(
            label=self.labels[best],
            confidence=row[best],
            scores=dict(zip(self.labels, row, strict=True)),
        )


def _buckets(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two below max_batch_size, and max_batch_size: at most 2x padding."""
    sizes = {max_batch_size}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def _encode_prompt(checkpoint: LoadedCheckpoint, prompt_text: str) -> _Prompt:
    """Tokenize the prompt once through the processor itself, so the number of image tokens
    and the special tokens are exactly what processor(text=..., images=...) produces."""
    processor = checkpoint.processor
    # Any size works (the image processor resizes); the crop size just avoids a resample.
    crop = getattr(processor.image_processor, "crop_size", None) or {}  # dict or SizeDict
    dummy = Image.new("RGB", (crop.get("width") or 224, crop.get("height") or 224))
    encoded = processor(text=prompt_text, images=dummy, return_tensors="pt")
    input_ids = encoded["input_ids"]
    image_token_id = checkpoint.model.config.image_token_id
    image_tokens = int((input_ids == image_token_id).sum())
    if image_tokens == 0:
        raise ModelLoadError(
            f"model.path {checkpoint.path}: the prompt holds no image token "
            f"(id {image_token_id}) after processing; the processor's image_token must match "
            "config.json's image_token_index"
        )
    return _Prompt(
        input_ids=input_ids.to(checkpoint.device),
        attention_mask=encoded["attention_mask"].to(checkpoint.device),
        pixel_shape=tuple(encoded["pixel_values"].shape[1:]),
        image_tokens=image_tokens,
    )


def label_sequences(
    tokenizer: Any, prompt_text: str, labels: Sequence[str], words: Sequence[str]
) -> list[list[int]]:
    """The tokens the model would generate for each answer word right after the prompt.

    Raises ModelLoadError if a word is unknown or two labels have the same tokens. Labels
    that only share a first token are fine: the engine then scores whole sequences.
    """
    prompt_ids: list[int] = tokenizer(prompt_text)["input_ids"]
    specials = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    owners: dict[tuple[int, ...], str] = {}
    sequences: list[list[int]] = []
    for label, word in zip(labels, words, strict=True):
        # Tokenizing prompt + " word" (not the bare word) gives the tokens as they follow
        # the prompt, e.g. "▁happy" for Llama's sentencepiece rather than "happy".
        full_ids: list[int] = tokenizer(f"{prompt_text} {word}")["input_ids"]
        start = _first_new_token(prompt_ids, full_ids, word, specials)
        sequence = [t for t in full_ids[start:] if t not in specials]
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in sequence:
            raise ModelLoadError(
                f"answer word {word!r} is unknown to the tokenizer; choose "
                "model.answer_words from the model's vocabulary"
            )
        key = tuple(sequence)
        if key in owners:
            raise ModelLoadError(
                f"labels {owners[key]!r} and {label!r} have the same tokens "
                f"{tokenizer.convert_ids_to_tokens(sequence)}, so the model cannot tell "
                "them apart; choose distinct model.answer_words"
            )
        owners[key] = label
        sequences.append(sequence)
    return sequences


def label_token_ids(
    tokenizer: Any, prompt_text: str, labels: Sequence[str], words: Sequence[str]
) -> list[int]:
    """The first token of each label's sequence (see label_sequences)."""
    return [seq[0] for seq in label_sequences(tokenizer, prompt_text, labels, words)]


def _first_new_token(
    prompt_ids: list[int], full_ids: list[int], word: str, specials: set[int]
) -> int:
    """Index in full_ids of the first token after the prompt."""
    # Trailing special tokens (an EOS some tokenizers append) may differ; the rest must not.
    core = len(prompt_ids)
    while core and prompt_ids[core - 1] in specials:
        core -= 1
    shared = 0
    for before, after in zip(prompt_ids, full_ids, strict=False):
        if before != after:
            break
        shared += 1
    if shared < core:
        # The word merged with the end of the prompt: its first token is not one the model
        # would generate after the prompt as given.
        raise ModelLoadError(
            f"answer word {word!r} merges with the end of model.prompt when tokenized; end "
            "the prompt with a separator such as ':'"
        )
    if shared >= len(full_ids) or full_ids[shared] in specials:
        raise ModelLoadError(f"answer word {word!r} adds no token after model.prompt; fix it")
    return shared
