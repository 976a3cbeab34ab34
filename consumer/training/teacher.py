"""The distillation teacher: a VGG-style CNN trained on the training part of the split only.

A small ViT trained from scratch on 26k faces underfits and learns slowly: nothing in it
says that neighbouring pixels belong together. A CNN has that prior built in and reaches
~70% on FER-2013 in a few dozen epochs; the shipped LLaVA then learns from the teacher's
full distribution over the labels (`consumer.training.loss.distillation_loss`), which is how
a ViT gets a CNN's inductive bias without changing what ships. The teacher is never shipped:
it lives in a work folder (`--teacher`), as safetensors with a JSON of its settings and
its log, so a second run with the same settings and data reuses it instead of training again.

Recipe (what works on FER): VGG blocks of two 3x3 convolutions with batch norm, SGD with
Nesterov momentum, one-cycle cosine schedule, no label smoothing, random resized crops,
flips, +-10 degree rotations and random erasing. On a CPU with bf16 matrix units (AMX) the
convolutions run in bfloat16 under autocast, about 3.5x faster than float32 with channels-last.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (torch's convention)

from consumer.training.dataset import Augment
from consumer.training.metrics import classification_report

TEACHER_FILE = "teacher.safetensors"
TEACHER_META = "teacher.json"


@dataclass(frozen=True)
class TeacherConfig:
    """How the teacher is built and trained; its hash names the weights it produced."""

    widths: tuple[int, ...] = (32, 64, 128, 256)
    hidden: int = 256
    dropout: float = 0.3
    epochs: int = 40
    batch_size: int = 128
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    augment: Augment = field(
        default_factory=lambda: Augment(
            scale=(0.75, 1.0), degrees=10.0, brightness=0.2, contrast=0.2, erase=0.5
        )
    )

    def to_json(self) -> dict[str, Any]:
        """JSON-ready settings (the augmentation as a dict)."""
        return asdict(self)


class TeacherNet(torch.nn.Module):
    """VGG-style: per width two conv3x3-BN-ReLU and a 2x2 max pool, then an MLP head."""

    def __init__(self, config: TeacherConfig, labels: int, image_size: int) -> None:
        """Gray input (B, 1, S, S); S must survive len(widths) halvings."""
        super().__init__()
        layers: list[torch.nn.Module] = []
        channels = 1
        for width in config.widths:
            for _ in range(2):
                layers += [
                    torch.nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    torch.nn.BatchNorm2d(width),
                    torch.nn.ReLU(inplace=True),
                ]
                channels = width
            layers.append(torch.nn.MaxPool2d(2))
        side = image_size >> len(config.widths)
        if side < 1:
            raise ValueError(f"image size {image_size} is too small for {len(config.widths)} pools")
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Dropout(config.dropout),
            torch.nn.Linear(channels * side * side, config.hidden),
            torch.nn.ReLU(inplace=True),
            torch.nn.Dropout(config.dropout),
            torch.nn.Linear(config.hidden, labels),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 faces (B, 1|3, S, S) -> float32 logits (B, labels)."""
        x = images.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)  # the worker's faces may be RGB; FER is gray
        x = (x / 255 - 0.5) / 0.25
        x = x.contiguous(memory_format=torch.channels_last)
        logits: torch.Tensor = self.head(self.features(x))
        return logits.float()


def fast_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 where the hardware runs it fast (CUDA, CPUs with AMX or AVX512-BF16), else None."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if _cpu_has_bf16() else None


@functools.cache
def _cpu_has_bf16() -> bool:
    # Read once: the distilling loop asks on every step (teacher_logits).
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def teacher_key(config: TeacherConfig, train_paths: Sequence[str], seed: int, size: int) -> str:
    """What the teacher's weights depend on: its settings, the training faces, seed, size."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config.to_json(), sort_keys=True).encode())
    digest.update(f"{seed}:{size}".encode())
    for path in train_paths:
        digest.update(path.encode() + b"\n")
    return digest.hexdigest()[:16]


def load_teacher(
    folder: Path, key: str, config: TeacherConfig, labels: int, image_size: int
) -> TeacherNet | None:
    """The teacher stored in `folder` if it was trained with exactly this key, else None.

    The key covers `config`, so a stored teacher with this key was built from it.
    """
    meta_path, weights = folder / TEACHER_META, folder / TEACHER_FILE
    if not (meta_path.is_file() and weights.is_file()):
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("key") != key or meta.get("status") != "finished":
        return None
    from safetensors.torch import load_file

    model = TeacherNet(config, labels, image_size)
    model.load_state_dict(load_file(weights))
    return model.eval()


def train_teacher(
    config: TeacherConfig,
    train_pixels: torch.Tensor,
    train_targets: torch.Tensor,
    *,
    labels: Sequence[str],
    seed: int,
    device: torch.device,
    folder: Path,
    key: str,
    report_pixels: torch.Tensor | None = None,
    report_targets: Sequence[int] | None = None,
    emit: Callable[[str], None] = print,
) -> TeacherNet:
    """Train the teacher on the training faces and store it in `folder`.

    The last epoch is kept: the validation faces (`report_*`) are only measured for the
    log and the model card, never used to choose anything.
    """
    torch.manual_seed(seed)
    image_size = int(train_pixels.shape[-1])
    model = TeacherNet(config, len(labels), image_size).to(device)
    model = model.to(memory_format=torch.channels_last)
    dtype = fast_dtype(device)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=True,
        weight_decay=config.weight_decay,
    )
    steps_per_epoch = math.ceil(len(train_targets) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = max(1, round(steps_per_epoch * config.warmup_epochs))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    order = torch.Generator().manual_seed(seed)
    augment_generator = torch.Generator().manual_seed(seed + 1)
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "teacher_log.jsonl"
    log_path.write_text("", encoding="utf-8")
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        permutation = torch.randperm(len(train_targets), generator=order)
        correct = 0
        loss_sum = 0.0
        for step in range(steps_per_epoch):
            batch = permutation[step * config.batch_size : (step + 1) * config.batch_size]
            images = config.augment(train_pixels[batch], augment_generator).to(device)
            targets = train_targets[batch].to(device)
            with torch.autocast(
                device.type, dtype=dtype or torch.float32, enabled=dtype is not None
            ):
                logits = model(images)
            loss = F.cross_entropy(logits, targets)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += float(loss.detach()) * len(batch)
            correct += int((logits.argmax(dim=1) == targets).sum())
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": round(loss_sum / len(train_targets), 4),
            "train_accuracy": round(correct / len(train_targets), 4),
            "train_s": round(time.perf_counter() - epoch_start, 1),
        }
        if report_pixels is not None and report_targets is not None:
            predicted = teacher_logits(model, report_pixels, device).argmax(dim=1).tolist()
            report = classification_report(list(report_targets), predicted, labels)
            record["val_accuracy"] = report["accuracy"]
            record["val_macro_f1"] = report["macro_f1"]
        with log_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        emit(
            f"teacher epoch {epoch}/{config.epochs}: loss {record['train_loss']:.4f} train acc "
            f"{record['train_accuracy']:.3f}"
            + (f" | val acc {record['val_accuracy']:.4f}" if "val_accuracy" in record else "")
            + f" | {record['train_s']:.0f} s"
        )
    model.eval()
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / TEACHER_FILE))
    meta = {
        "key": key,
        "status": "finished",
        "config": config.to_json(),
        "seed": seed,
        "image_size": image_size,
        "train_faces": len(train_targets),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype or torch.float32),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "last_epoch": record,
    }
    (folder / TEACHER_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return model


@torch.no_grad()
def teacher_logits(
    model: TeacherNet, pixels: torch.Tensor, device: torch.device, batch_size: int = 512
) -> torch.Tensor:
    """float32 logits (N, labels) on the CPU of uint8 faces, in eval mode."""
    was_training = model.training
    model.eval()
    dtype = fast_dtype(device)
    out = []
    for start in range(0, pixels.shape[0], batch_size):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out.append(model(pixels[start : start + batch_size].to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(out)
