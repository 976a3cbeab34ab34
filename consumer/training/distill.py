"""The distillation run's parts around the loop: its teacher (trained or reused) and the
temperature that calibrates the finished checkpoint (split out of loop.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from consumer.training.calibration import fit_temperature, fold_temperature
from consumer.training.config import TrainConfig
from consumer.training.dataset import Example, Normalizer, load_pixels
from consumer.training.model import AnswerFormat, load_init_model, save_checkpoint
from consumer.training.teacher import (
    TEACHER_META,
    TeacherConfig,
    TeacherNet,
    load_teacher,
    teacher_key,
    train_teacher,
)
from consumer.training.validation import predict_logits


def prepare_teacher(
    config: TrainConfig,
    train: Sequence[Example],
    train_pixels: torch.Tensor,
    train_targets: torch.Tensor,
    val_pixels: torch.Tensor,
    val_targets: Sequence[int],
    device: torch.device,
    emit: Callable[[str], None],
) -> TeacherNet:
    """The teacher in config.teacher if one was trained there on exactly these faces with
    these settings, else a new one trained now (on the training part only) and stored there."""
    assert config.teacher is not None
    settings = TeacherConfig(epochs=config.teacher_epochs)
    key = teacher_key(settings, [e.path for e in train], config.seed, config.image_size)
    teacher = load_teacher(config.teacher, key, settings, len(config.labels), config.image_size)
    if teacher is not None:
        emit(f"teacher: reusing {config.teacher} (key {key})")
    else:
        emit(f"teacher: training {settings.epochs} epochs into {config.teacher} (key {key})")
        teacher = train_teacher(
            settings,
            train_pixels,
            train_targets,
            labels=config.labels,
            seed=config.seed,
            device=device,
            folder=config.teacher,
            key=key,
            report_pixels=val_pixels,
            report_targets=val_targets,
            emit=emit,
        )
    return teacher.to(device).eval()


def teacher_summary(folder: Path | None) -> dict[str, Any] | None:
    """The teacher's settings and last epoch (with its validation score), for the card."""
    if folder is None or not (folder / TEACHER_META).is_file():
        return None
    meta: dict[str, Any] = json.loads((folder / TEACHER_META).read_text(encoding="utf-8"))
    return meta


def calibrate(
    out: Path,
    config: TrainConfig,
    calibration: Sequence[Example],
    normalize: Normalizer,
    fmt: AnswerFormat,
    device: torch.device,
    emit: Callable[[str], None],
) -> dict[str, Any]:
    """Fit the temperature on the calibration faces, fold it into the saved checkpoint."""
    from consumer.eval.metrics import calibration as calibration_table

    model, processor, _ = load_init_model(out, str(device))
    pixels = load_pixels(config.data, calibration, config.image_size)
    targets = torch.tensor([e.label for e in calibration])
    logits = predict_logits(
        model, fmt, pixels, normalize, batch_size=config.eval_batch_size, device=device
    )

    def ece(temperature: float) -> float:
        probabilities = (logits.double() / temperature).softmax(dim=1)
        confidence, predicted = probabilities.max(dim=1)
        return calibration_table(confidence.tolist(), (predicted == targets).tolist()).ece

    temperature = fit_temperature(logits, targets)
    fold_temperature(model, temperature)
    save_checkpoint(model, processor, out)
    result = {
        "temperature": round(temperature, 4),
        "faces": len(calibration),
        "ece_before": round(ece(1.0), 4),
        "ece_after": round(ece(temperature), 4),
    }
    emit(
        f"calibration: temperature {temperature:.3f} on {len(calibration)} held-out training "
        f"faces, ECE {result['ece_before']:.4f} -> {result['ece_after']:.4f}"
    )
    return result


def card_lines(config: TrainConfig, args: dict[str, Any]) -> list[str]:
    """The model card's lines on the teacher and the temperature, when the run had them."""
    lines: list[str] = []
    teacher = args.get("teacher_summary")
    if teacher:
        settings, last = teacher["config"], teacher["last_epoch"]
        score = (
            f"; validation accuracy {last['val_accuracy']:.4f}, macro-F1 "
            f"{last['val_macro_f1']:.4f} (measured only, never used to choose)"
            if "val_accuracy" in last
            else ""
        )
        lines += [
            "",
            f"Distilled from a VGG-style CNN teacher (widths {settings['widths']}, "
            f"{teacher['parameters'] / 1e6:.2f}M parameters, {settings['epochs']} epochs, SGD "
            f"Nesterov lr {settings['lr']:g}, random erasing; trained on the training part only, "
            f"{teacher['wall_time_s'] / 60:.1f} min{score}). Loss: cross-entropy + "
            f"{config.distill_weight:g} x T^2 x KL(teacher || student) on the label tokens at "
            f"T = {config.distill_temperature:g}, the teacher seeing the same augmented view. "
            "The teacher is not shipped.",
        ]
    calibration = args.get("calibration")
    if calibration:
        lines += [
            "",
            f"Calibration: temperature {calibration['temperature']:.3f} fitted on "
            f"{calibration['faces']} held-out training faces (split.json's calibration list; no "
            f"model trained on them) and folded into lm_head: ECE there "
            f"{calibration['ece_before']:.4f} -> {calibration['ece_after']:.4f}.",
        ]
    return lines
