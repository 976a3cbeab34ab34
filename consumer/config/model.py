"""The model step: the checkpoint, its labels and prompt, and the micro-batches it runs on."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from consumer.config.base import Section

FER_LABELS: tuple[str, ...] = (
    "angry",
    "disgusted",
    "fearful",
    "happy",
    "neutral",
    "sad",
    "surprised",
)

# LLaVA-1.5's conversation format; `{labels}` is filled with the configured answer words.
DEFAULT_PROMPT = (
    "USER: <image>\nWhich emotion does this face show? Answer with one word: {labels}. ASSISTANT:"
)


class ModelSettings(Section):
    """The LLaVA checkpoint, its labels and prompt, and how the model step runs."""

    path: Path = Field(
        default=Path(".cache/models/tiny-llava"),
        description="Local checkpoint folder in the Hugging Face layout (safetensors weights).",
    )
    labels: tuple[str, ...] = Field(
        default=FER_LABELS,
        description="Label names written into results: at least two, no duplicates.",
    )
    answer_words: tuple[str, ...] | None = Field(
        default=None,
        description=(
            "The word the model answers for each label, one per label in the same order. "
            "None: the labels themselves."
        ),
    )
    prompt: str = Field(
        default=DEFAULT_PROMPT,
        description=(
            "The prompt (LLaVA-1.5's conversation format); must contain the image "
            "placeholder `<image>`, and `{labels}` is filled with the answer words."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="`auto`: `cuda` when available, else `cpu`."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description=(
            "`auto`: `float32` on cpu; on cuda `float32` for a checkpoint of fewer than 100M "
            "parameters (such a model is bound by kernel launches, so float32 costs little "
            "and scores as the CPU does), else `bfloat16`. The choice and its reason are "
            "logged (`dtype chosen`)."
        ),
    )
    model_id: str | None = Field(
        default=None,
        description="Model name written into results. None: the checkpoint folder's name.",
    )
    preprocess: Literal["device", "processor"] = Field(
        default="device",
        description=(
            "Where resize/crop/normalise run: `device` (batched torch ops on the model's "
            "device, reproducing the checkpoint's preprocessor config) or `processor` (the "
            "checkpoint's own Hugging Face image processor on the CPU, the reference)."
        ),
    )
    compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "torch.compile of the language model over batch-size buckets: `auto` compiles "
            "on CUDA only; `on` forces it (slow to warm up on CPU); `off` never."
        ),
    )
    precision: Literal["auto", "bf16", "none", "fp8", "int8"] = Field(
        default="auto",
        description=(
            "Quantization of the language model's linear layers only; `model.dtype` stays "
            "the base dtype of everything else (vision tower, projector, `lm_head`, "
            "embeddings, norms). `bf16`, or its synonym `none`: no quantization, the layers "
            "run in `model.dtype` (by default bfloat16 on a GPU for checkpoints of 100M+ "
            "parameters, else float32; float32 on the CPU, whatever the name says). "
            "`fp8`: e4m3 weights and activations with rowwise "
            "scales; needs a GPU of compute capability 8.9+ (Ada, Hopper), else start-up "
            "fails. `int8`: W8A8 (per-channel weight and per-token activation scales, "
            "SmoothQuant) on `torch._int_mm`; also runs on the CPU, for tests. `auto` "
            "(default): no quantization on the CPU, as before; on a GPU, `fp8` (8.9+) or "
            "`int8` (8.0-8.8) only if a start-up check finds it at least 1.05x faster on "
            "this model's layers (int8 must also keep every checked layer's output at "
            "cosine >= 0.999), else none. The choice and its numbers are logged."
        ),
    )
    tta: Literal["none", "flip"] = Field(
        default="none",
        description=(
            "Test-time augmentation. `flip`: each face is scored as it is and mirrored "
            "left-right in the same forward pass (the batch holds both), and the two "
            "probability vectors are averaged; expressions are mirror-symmetric, so this "
            "trades about half the faces/s for a steadier answer (docs/model.md has the "
            "measured gain and cost of the shipped model). `none`: one view."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _removed_settings(cls, data: Any) -> Any:
        # extra="forbid" would say only "Extra inputs are not permitted": name the new key.
        if isinstance(data, dict) and "fp8" in data:
            raise PydanticCustomError(
                "removed_setting",
                "model.fp8 was replaced by model.precision in 0.3.0: remove it (also "
                'EMOTION_WORKER_MODEL__FP8) and set model.precision = "fp8" (was fp8 = true) '
                'or "bf16" (was fp8 = false: no quantization)',
            )
        return data

    @model_validator(mode="after")
    def _check_labels(self) -> ModelSettings:
        if len(self.labels) < 2:
            raise ValueError("model.labels needs at least two labels")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"model.labels has duplicates: {list(self.labels)}")
        if self.answer_words is not None and len(self.answer_words) != len(self.labels):
            raise ValueError(
                "model.answer_words must have one word per label "
                f"({len(self.labels)}), got {len(self.answer_words)}"
            )
        if "<image>" not in self.prompt:
            raise ValueError("model.prompt must contain the image placeholder <image>")
        return self

    @property
    def words(self) -> tuple[str, ...]:
        """The answer word of each label."""
        return self.answer_words or self.labels


class BatchSettings(Section):
    """Micro-batching of faces into forward passes."""

    max_batch_size: int = Field(
        default=16, ge=1, le=1024, description="Most faces in one forward pass."
    )
    max_wait_ms: float = Field(
        default=20.0,
        ge=0,
        le=10_000,
        description="Longest wait to fill a batch, in milliseconds.",
    )
