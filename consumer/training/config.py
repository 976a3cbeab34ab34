"""A training run's settings (TrainConfig, written to training_args.json) and its result."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from consumer.training.dataset import Augment
from consumer.training.model import ARCHS

Balance = Literal["loss", "sampler", "none"]


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run; all of it is written to training_args.json."""

    data: Path
    out: Path
    labels: tuple[str, ...]
    prompt: str
    init: Path | None = None  # None: from scratch with `arch`
    arch: str = "small"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.05
    warmup: float = 0.03  # fraction of all steps
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    val_fraction: float = 0.1
    seed: int = 0
    image_size: int = 48
    limit: int | None = None
    threads: int | None = None
    balance: Balance = "loss"
    balance_power: float = 0.5
    smart_init: bool = True  # from scratch: PCA patch embedding, sin-cos positions, mimetic
    aux_weight: float = 1.0  # from scratch: vision probe loss weight, decayed linearly to 0
    augment: Augment = field(default_factory=Augment)
    select: Literal["accuracy", "macro_f1", "last"] = "accuracy"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_batch_size: int = 256
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_projector: Literal["full", "lora"] = "full"
    gradient_checkpointing: bool = False  # recompute activations: full-size models on a GPU
    command: str = ""  # the command line that started the run, for the model card
    # Distillation: a CNN teacher trained (or reused) in this folder; None: no teacher.
    teacher: Path | None = None
    teacher_epochs: int = 40
    distill_weight: float = 1.0  # loss = cross-entropy + weight * T^2 * KL(teacher || student)
    distill_temperature: float = 2.0
    # Stratified slice of the training part that nobody trains on; the temperature that
    # calibrates the scores is fitted on it and folded into lm_head. 0: no calibration.
    calibration_fraction: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings, augmentation as a dict)."""
        raw = asdict(self)
        raw["data"] = str(self.data.expanduser().resolve())
        raw["out"] = str(self.out)
        raw["init"] = str(self.init) if self.init else None
        raw["teacher"] = str(self.teacher) if self.teacher else None
        raw["labels"] = list(self.labels)
        raw["arch_sizes"] = ARCHS[self.arch].to_json() if self.init is None else None
        return raw


@dataclass
class TrainResult:
    """What a finished run produced."""

    out: Path
    best_epoch: int
    best_val: dict[str, Any]
    history: list[dict[str, Any]]
    eval_report: dict[str, Any]
    train_images_per_s: float
    wall_s: float


def describe_command(argv: Sequence[str]) -> str:
    """The command line of this run as one shell-quoted string."""
    return shlex.join(["emotion-worker", "train", *argv])
