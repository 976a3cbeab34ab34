"""The training run: data, model, answer-only loss, AdamW with warmup and cosine, epochs.

One call of `train(config)` does everything `emotion-worker train` promises: the seeded
stratified split (split.json), training with a tqdm progress bar, validation accuracy and
macro-F1 per epoch (train_log.jsonl), the best epoch's checkpoint in the Hugging Face
layout, training_args.json, a final evaluation of the saved folder through the worker's own
EmotionEngine (eval_report.json) and a model card (README.md).
"""

from __future__ import annotations

import json
import math
import platform
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812 (torch's convention)

from consumer.training.dataset import (
    NO_AUGMENT,
    Augment,
    Example,
    Normalizer,
    class_counts,
    load_pixels,
    scan_folder,
    stratified_split,
    subsample,
)
from consumer.training.metrics import classification_report
from consumer.training.model import (
    ARCHS,
    IGNORE_INDEX,
    AnswerFormat,
    build_scratch_model,
    init_vision_tower,
    load_init_model,
    save_checkpoint,
)
from consumer.training.probe import VisionProbe

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
    select: Literal["accuracy", "macro_f1"] = "accuracy"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_batch_size: int = 256
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_projector: Literal["full", "lora"] = "full"
    gradient_checkpointing: bool = False  # recompute activations: full-size models on a GPU
    command: str = ""  # the command line that started the run, for the model card

    def to_json(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings, augmentation as a dict)."""
        raw = asdict(self)
        raw["data"] = str(self.data.expanduser().resolve())
        raw["out"] = str(self.out)
        raw["init"] = str(self.init) if self.init else None
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


def class_weights(counts: Sequence[int], power: float) -> torch.Tensor:
    """Per-label loss weight (largest count / count) ** power, an average example weighing 1.

    power 0.5 (the default) quadruples "disgusted" against "happy" on FER: enough for the
    rare class to be predicted at all, without the precision collapse of full inverse
    frequency (power 1). Labels without training images get 0.
    """
    present = [c for c in counts if c]
    if not present or power == 0:
        return torch.tensor([1.0 if c else 0.0 for c in counts])
    largest = max(present)
    raw = [(largest / c) ** power if c else 0.0 for c in counts]
    scale = sum(present) / sum(r * c for r, c in zip(raw, counts, strict=True))
    return torch.tensor([r * scale for r in raw])


def vocab_weights(
    counts: Sequence[int], fmt: AnswerFormat, vocab: int, power: float
) -> torch.Tensor:
    """Cross-entropy weight per vocabulary id: each label's first answer token gets its
    class weight (`class_weights`); other tokens (EOS, later answer tokens) weigh 1."""
    weights = torch.ones(vocab)
    if power == 0:
        return weights
    for token, value in zip(fmt.first_tokens, class_weights(counts, power).tolist(), strict=True):
        if value:
            weights[token] = value
    return weights


def answer_loss(
    model: Any,
    fmt: AnswerFormat,
    pixel_values: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, label scores) of one batch: next-token cross-entropy on the answer only.

    The language model's hidden states are projected onto the vocabulary only at the
    positions that predict a supervised token (labels != IGNORE_INDEX after the shift),
    which for a 32k-vocabulary model saves a (batch x sequence x vocab) logits tensor.
    The label scores are the answer-position logits of each label's first token, the
    numbers the worker's engine turns into probabilities.
    """
    device = pixel_values.device
    input_ids, attention, labels = fmt.batch(targets.cpu())
    padded = bool((attention == 0).any())
    hidden = model.model(
        input_ids=input_ids.to(device),
        attention_mask=attention.to(device) if padded else None,
        pixel_values=pixel_values,
        use_cache=False,
    ).last_hidden_state
    shifted = labels[:, 1:].to(device)
    keep = shifted != IGNORE_INDEX
    logits = model.lm_head(hidden[:, :-1][keep]).float()
    loss = F.cross_entropy(
        logits,
        shifted[keep],
        weight=None if weight is None else weight.to(device),
        label_smoothing=label_smoothing,
    )
    answer_position = len(fmt.prompt_ids) - 1
    with torch.no_grad():
        rows = model.lm_head.weight[list(fmt.first_tokens)]
        scores = hidden[:, answer_position].detach().float() @ rows.float().T
    return loss, scores


@torch.no_grad()
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
    """Predicted label index per uint8 image, scored the way the engine scores labels.

    With distinct first answer tokens (a word-level tokenizer, or most BPE vocabularies),
    one pass over the prompt and the next-token logits of those tokens; otherwise the
    summed log-probability of each label's whole answer, one pass per label.
    """
    was_training = model.training
    model.eval()
    predictions: list[torch.Tensor] = []
    labels = len(fmt.answers)
    for start in range(0, images.shape[0], batch_size):
        pixels = normalize(images[start : start + batch_size]).to(device)
        count = pixels.shape[0]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if fmt.first_tokens_unique:
                ids, _ = fmt.prompt_batch(count)
                hidden = model.model(
                    input_ids=ids.to(device), pixel_values=pixels, use_cache=False
                ).last_hidden_state[:, -1]
                rows = model.lm_head.weight[list(fmt.first_tokens)]
                scores = hidden.float() @ rows.float().T
            else:
                scores = torch.stack(
                    [_sequence_score(model, fmt, pixels, k) for k in range(labels)], dim=1
                )
        predictions.append(scores.argmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)


def _sequence_score(
    model: Any, fmt: AnswerFormat, pixels: torch.Tensor, label: int
) -> torch.Tensor:
    answer = fmt.answers[label][: fmt.answer_lengths[label]]
    ids = torch.tensor(fmt.prompt_ids + answer[:-1], device=pixels.device)
    hidden = model.model(
        input_ids=ids.expand(pixels.shape[0], -1), pixel_values=pixels, use_cache=False
    ).last_hidden_state
    start = len(fmt.prompt_ids) - 1
    logits = model.lm_head(hidden[:, start : start + len(answer)]).float()
    targets = torch.tensor(answer, device=pixels.device).expand(pixels.shape[0], -1)
    picked = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    total: torch.Tensor = picked.sum(dim=1)
    return total


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to min_ratio of the peak learning rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; not on biases, norms, embeddings (as in ViT/LLaMA)."""
    decay: list[torch.nn.Parameter] = []
    plain: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        embedding = "embedding" in name or "embed_tokens" in name
        (decay if parameter.ndim >= 2 and not embedding else plain).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


class _Order:
    """The example order of each epoch, drawn from one seeded generator."""

    def __init__(self, labels: torch.Tensor, balance: Balance, power: float, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.count = labels.shape[0]
        self.weights: torch.Tensor | None = None
        if balance == "sampler":
            per_class = torch.bincount(labels).float().clamp(min=1)
            self.weights = per_class.pow(-power)[labels]

    def __call__(self) -> torch.Tensor:
        if self.weights is None:
            return torch.randperm(self.count, generator=self.generator)
        # Balanced sampling: each epoch draws as many examples as there are, with
        # replacement, rare classes more often.
        return torch.multinomial(
            self.weights, self.count, replacement=True, generator=self.generator
        )


def _git_commit() -> dict[str, Any]:
    repo = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "consumer"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def _versions(lora: bool) -> dict[str, str]:
    import numpy
    import tokenizers
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": numpy.__version__,
    }
    if lora:
        import peft

        versions["peft"] = peft.__version__
    return versions


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _counts_by_label(examples: Sequence[Example], labels: Sequence[str]) -> dict[str, int]:
    return dict(zip(labels, class_counts(examples, len(labels)), strict=True))


def train(config: TrainConfig, *, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run one training job as configured; returns the best epoch and the final evaluation."""
    from tqdm import tqdm  # type: ignore[import-untyped]  # ships no type information
    from transformers.utils import logging as transformers_logging

    emit = log or tqdm.write
    # transformers' own bars (writing shards, loading weights) would break up ours.
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    started = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.lora and config.init is None:
        raise ValueError("--lora fine-tunes an existing checkpoint: give --init PATH")
    torch.manual_seed(config.seed)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)

    # Data: list, split (stratified, seeded), decode once.
    examples = scan_folder(config.data, config.labels)
    if config.limit is not None:
        examples = subsample(examples, config.limit, config.seed)
    split = stratified_split(examples, config.val_fraction, config.seed)
    _write_json(out / "split.json", {"seed": config.seed, **split.to_json()})
    emit(
        f"data: {len(examples)} images, {len(split.train)} train / {len(split.val)} val "
        f"({_counts_by_label(split.train, config.labels)})"
    )
    train_pixels = load_pixels(config.data, split.train, config.image_size)
    val_pixels = load_pixels(config.data, split.val, config.image_size)
    train_targets = torch.tensor([e.label for e in split.train])
    val_targets = [e.label for e in split.val]

    # Model.
    from consumer.engine.loader import resolve_device

    if config.init is None:
        model, processor = build_scratch_model(
            ARCHS[config.arch],
            image_size=config.image_size,
            labels=config.labels,
            prompt=config.prompt,
            seed=config.seed,
        )
        if config.smart_init:
            picked = torch.randperm(
                len(split.train), generator=torch.Generator().manual_seed(config.seed)
            )[:2048]
            sample = Normalizer.for_processor(processor.image_processor)(train_pixels[picked])
            init_vision_tower(model, sample, config.seed)
        device = resolve_device(config.device)
        model.to(device)
    else:
        model, processor, device = load_init_model(config.init, config.device)
    save_dtype = next(model.parameters()).dtype
    autocast = device.type == "cuda" and save_dtype != torch.float32
    normalize = Normalizer.for_processor(processor.image_processor)
    input_size = normalize.size
    prompt_text = config.prompt.format(labels=", ".join(config.labels))
    fmt = AnswerFormat.build(
        processor, model.config, prompt_text, config.labels, config.labels, input_size
    )
    peft_model = None
    if config.lora:
        from consumer.training.lora import apply_lora

        peft_model = apply_lora(
            model,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            projector=config.lora_projector,
        )
    elif config.init is not None and save_dtype != torch.float32:
        model.float()  # full fine-tuning keeps float32 master weights (autocast computes)
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing also works when the inputs need no gradient (LoRA).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total_params = sum(p.numel() for p in model.parameters())
    emit(
        f"model: {total_params / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trained), "
        f"{sum(1 for t in fmt.prompt_ids if t == fmt.image_token_id)} image tokens, "
        f"sequence {len(fmt.prompt_ids) + max(len(a) for a in fmt.answers)}, device {device}"
    )

    counts = class_counts(split.train, len(config.labels))
    weight = (
        vocab_weights(counts, fmt, model.lm_head.weight.shape[0], config.balance_power)
        if config.balance == "loss"
        else None
    )
    probe = (
        VisionProbe(model, len(config.labels)).to(device)
        if config.init is None and config.aux_weight > 0
        else None
    )
    probe_weight = class_weights(counts, config.balance_power) if config.balance == "loss" else None
    trained = [p for p in model.parameters() if p.requires_grad]
    if probe is not None:
        trained += list(probe.parameters())
    order = _Order(train_targets, config.balance, config.balance_power, config.seed)
    augment_generator = torch.Generator().manual_seed(config.seed + 1)
    steps_per_epoch = math.ceil(len(split.train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    groups = _param_groups(model, config.weight_decay)
    if probe is not None:
        groups += _param_groups(probe, config.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))
    warmup_steps = max(1, round(total_steps * config.warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, warmup_steps, config.min_lr_ratio)
    )

    args = {
        **config.to_json(),
        "device_used": str(device),
        "threads_used": torch.get_num_threads(),
        "counts": {
            "all": _counts_by_label(examples, config.labels),
            "train": _counts_by_label(split.train, config.labels),
            "val": _counts_by_label(split.val, config.labels),
        },
        "parameters": total_params,
        "trained_parameters": trainable,
        "sequence_length": len(fmt.prompt_ids) + max(len(a) for a in fmt.answers),
        "steps": total_steps,
        "git": _git_commit(),
        "versions": _versions(config.lora),
        "started_at": started_at,
    }
    _write_json(out / "training_args.json", {**args, "status": "running"})
    log_file = out / "train_log.jsonl"
    log_file.write_text("", encoding="utf-8")

    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    train_seconds = 0.0
    seen = 0
    global_step = 0
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        indices = order()
        running_loss, correct, probe_correct, count = 0.0, 0, 0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            dynamic_ncols=True,
            mininterval=1.0,
            leave=False,
        )
        for step in bar:
            batch = indices[step * config.batch_size : (step + 1) * config.batch_size]
            pixels = normalize(config.augment(train_pixels[batch], augment_generator))
            targets = train_targets[batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, scores = answer_loss(
                    model,
                    fmt,
                    pixels.to(device),
                    targets,
                    weight=weight,
                    label_smoothing=config.label_smoothing,
                )
            total = loss
            if probe is not None:
                probe_logits = probe.logits()
                aux = config.aux_weight * max(0.0, 1 - global_step / total_steps)
                total = loss + aux * F.cross_entropy(
                    probe_logits,
                    targets.to(device),
                    weight=None if probe_weight is None else probe_weight.to(device),
                    label_smoothing=config.label_smoothing,
                )
                probe_correct += int((probe_logits.argmax(dim=1).cpu() == targets).sum())
            total.backward()  # type: ignore[no-untyped-call]
            global_step += 1
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            size = int(targets.shape[0])
            running_loss += float(loss.detach()) * size
            correct += int((scores.argmax(dim=1).cpu() == targets).sum())
            count += size
            bar.set_postfix(
                loss=f"{running_loss / count:.3f}",
                acc=f"{correct / count:.3f}",
                lr=f"{scheduler.get_last_lr()[0]:.1e}",
                refresh=False,
            )
        bar.close()
        train_time = time.perf_counter() - epoch_start
        train_seconds += train_time
        seen += count
        predicted = predict(
            model,
            fmt,
            val_pixels,
            normalize,
            batch_size=config.eval_batch_size,
            device=device,
            autocast=autocast,
        ).tolist()
        report = classification_report(val_targets, predicted, config.labels)
        record = {
            "epoch": epoch,
            "train_loss": round(running_loss / max(count, 1), 4),
            "train_accuracy": round(correct / max(count, 1), 4),
            "probe_train_accuracy": round(probe_correct / max(count, 1), 4) if probe else None,
            "val_accuracy": report["accuracy"],
            "val_macro_f1": report["macro_f1"],
            "val_recall": {k: v["recall"] for k, v in report["per_class"].items()},
            "lr": scheduler.get_last_lr()[0],
            "train_s": round(train_time, 1),
            "val_s": round(time.perf_counter() - epoch_start - train_time, 1),
            "train_images_per_s": round(count / train_time, 1),
        }
        improved = best is None or report[config.select] > best[f"val_{config.select}"]
        record["best"] = improved
        history.append(record)
        with log_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        emit(
            f"epoch {epoch}/{config.epochs}: loss {record['train_loss']:.4f} "
            f"train acc {record['train_accuracy']:.3f} | val acc {report['accuracy']:.4f} "
            f"macro-F1 {report['macro_f1']:.4f} | {record['train_images_per_s']:.0f} img/s"
            + (" *best" if improved else "")
        )
        if improved:
            best = record
            if peft_model is None:
                save_checkpoint(model, processor, out)
            else:
                from consumer.training.lora import trainable_state

                best_state = trainable_state(model)
    if probe is not None:
        probe.close()
    if best is None:
        raise ValueError("--epochs must be at least 1")

    if peft_model is not None:
        from consumer.training.lora import merge_lora, restore_state

        if best_state is not None:
            restore_state(model, best_state)
        model = merge_lora(peft_model, save_dtype)
        save_checkpoint(model, processor, out)
    elif save_dtype != torch.float32 and config.init is not None:
        # The best epoch was saved in float32; store it in the checkpoint's own dtype.
        model, processor, _ = load_init_model(out, "cpu")
        save_checkpoint(model.to(save_dtype), processor, out)

    eval_report = evaluate_checkpoint(
        out, config.data, split.val, config.labels, config.prompt, device=str(device)
    )
    training_agrees = abs(eval_report["accuracy"] - best["val_accuracy"]) <= 0.005
    eval_report["matches_training_validation"] = training_agrees
    _write_json(out / "eval_report.json", eval_report)
    if not training_agrees:
        emit(
            f"warning: the saved checkpoint scores {eval_report['accuracy']:.4f} through the "
            f"engine, but {best['val_accuracy']:.4f} during training"
        )
    wall = time.perf_counter() - started
    images_per_s = seen / train_seconds if train_seconds else 0.0
    _write_json(
        out / "training_args.json",
        {
            **args,
            "status": "finished",
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "wall_time_s": round(wall, 1),
            "train_images_per_s": round(images_per_s, 1),
            "best_epoch": best["epoch"],
            "best_val": {k: best[k] for k in ("val_accuracy", "val_macro_f1")},
        },
    )
    _write_model_card(out, config, args, history, best, eval_report, wall)
    emit(
        f"best epoch {best['epoch']}: val acc {eval_report['accuracy']:.4f}, macro-F1 "
        f"{eval_report['macro_f1']:.4f} (engine, {eval_report['engine_images_per_s']:.0f} "
        f"faces/s); wrote {out}"
    )
    return TrainResult(
        out=out,
        best_epoch=int(best["epoch"]),
        best_val=best,
        history=history,
        eval_report=eval_report,
        train_images_per_s=images_per_s,
        wall_s=wall,
    )


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


# The name of the model `make model` writes (the Makefile's MODEL_OUT); its card names the
# make target as well as the command.
SHIPPED_MODEL = "llava-fer-small"
# What the card says the training data is: the trainer is built for FER-2013 style faces.
DATA_PLACEHOLDER = "<FER-2013 train folder>"
CARD_TAGS = (
    "llava",
    "image-text-to-text",
    "facial-expression-recognition",
    "emotion-recognition",
    "fer2013",
    "biometrics",
)


def _write_model_card(
    out: Path,
    config: TrainConfig,
    args: dict[str, Any],
    history: list[dict[str, Any]],
    best: dict[str, Any],
    report: dict[str, Any],
    wall: float,
) -> None:
    """README.md of a trained checkpoint: Hugging Face metadata, intended use, the run.

    The card must read the same on any machine: no absolute path of the machine it was
    trained on (the command's --data, --out and --init are replaced by portable forms;
    training_args.json keeps the faithful record).
    """
    (out / "README.md").write_text(
        render_model_card(out.name, config, args, history, best, report, wall),
        encoding="utf-8",
    )


def render_model_card(
    name: str,
    config: TrainConfig,
    args: dict[str, Any],
    history: list[dict[str, Any]],
    best: dict[str, Any],
    report: dict[str, Any],
    wall: float,
) -> str:
    """The text of the model card of checkpoint `name` (see _write_model_card)."""
    arch = ARCHS[config.arch] if config.init is None else None
    base = _base_model_id(config.init) if config.init is not None else None
    counts: dict[str, int] = args["counts"]["all"]
    weakest_label, weakest = min(report["per_class"].items(), key=lambda item: item[1]["f1"])
    lines = [
        *_front_matter(name, base, config, report),
        f"# {name}: facial expression LLaVA ({'LoRA fine-tune' if config.lora else 'trained'})",
        "",
        "A LlavaForConditionalGeneration that answers the worker's prompt with one of the "
        f"labels {', '.join(config.labels)}. Written by `emotion-worker train`.",
        "",
        "## Intended use",
        "",
        "Faces are biometric data, and emotion recognition is restricted in some places: the "
        "EU AI Act prohibits emotion recognition systems in the workplace and in education "
        "institutions, except for medical or safety reasons, treats them as high-risk "
        "elsewhere, and requires that the people exposed to them are informed. Check the law "
        "where the model runs before deploying it.",
        "",
        "For:",
        "",
        "- aggregate sentiment analytics over camera or video streams whose subjects were "
        "told and consented (e.g. the share of smiling faces in an audience), where no "
        "individual is singled out;",
        "- research on facial expression recognition and on serving vision-language models;",
        "- a demo of this worker (`emotion-worker demo`).",
        "",
        "Not for:",
        "",
        "- decisions about individuals: hiring, grading or proctoring, policing, surveillance, "
        "insurance, credit, or any other assessment of a person;",
        "- inferring inner states as facts: the model names which of "
        f"{len(config.labels)} expression categories a face resembles, not what the person "
        "feels;",
        "- use on children;",
        "- any use without notice or consent where the law requires them (and, in the EU, "
        "the workplace and education uses above).",
        "",
        "## Limitations",
        "",
        "- FER-2013 faces are 48x48 grey, tightly cropped and aligned web images; other crops, "
        "colour, resolution, head poses and lighting are out of distribution, and accuracy on "
        "your cameras is not measured here.",
        "- FER-2013 labels are noisy (human agreement is about 65%), and the categories are "
        f"imbalanced: the weakest class is {weakest_label} (F1 {weakest['f1']:.3f}, "
        f"{weakest['support']} validation images).",
        "- Demographic skew is not measured: FER-2013 has no age, gender or skin-tone "
        "annotations, so accuracy per group is unknown and may differ between groups.",
        "",
        "## Licence",
        "",
        "The weights are released under Apache-2.0, as part of this project. The training "
        "images are not: they are FER-2013 (Goodfellow et al., ICML 2013 Challenges in "
        "Representation Learning, distributed through Kaggle), collected from web image "
        "searches, with no open licence of their own; their use is governed by FER-2013's "
        "terms. Check them (and the rules on biometric data where you are) before "
        "redistributing the images or using models trained on them commercially.",
        "",
        "## Reproduce",
        "",
        "```",
        _portable_command(config.command, name, base)
        if config.command
        else "emotion-worker train ...",
        "```",
        "",
        *_data_note(name, config.data),
        f"Seed {config.seed}, {args['threads_used']} threads, device {args['device_used']}; "
        "every setting is in training_args.json, the split in split.json, the per-epoch log "
        "in train_log.jsonl. Bit-identical results need the same thread count and versions.",
        "",
        "## Model",
        "",
    ]
    if arch is not None:
        tokens = (config.image_size // arch.patch_size) ** 2
        lines += [
            f"Trained from scratch. Vision: CLIP ViT, {config.image_size}x{config.image_size} "
            f"input, patch {arch.patch_size} ({tokens} image tokens), hidden "
            f"{arch.vision_hidden}, {arch.vision_layers} layers, {arch.vision_heads} heads, MLP "
            f"{arch.vision_hidden * arch.vision_mlp}; feature layer -1. Language model: Llama, "
            f"hidden {arch.text_hidden}, {arch.text_layers} layers, {arch.text_heads} heads, MLP "
            f"{arch.text_hidden * arch.text_mlp}; word-level tokenizer covering the prompt and "
            f"labels. {args['parameters'] / 1e6:.2f}M parameters, float32.",
        ]
    else:
        lines += [
            f"Fine-tuned from `{base}`"
            + (
                f" with LoRA (rank {config.lora_rank}, alpha {config.lora_alpha}) on the "
                f"language model, projector {config.lora_projector}; adapters merged."
                if config.lora
                else " (all parameters)."
            ),
        ]
    per_class = ", ".join(f"{label} {count}" for label, count in counts.items())
    lines += [
        "",
        "## Training",
        "",
        f"Data: `{_portable_data(config.data)}` ({sum(counts.values())} images: {per_class}); "
        f"stratified split, {config.val_fraction:.0%} validation, seed {config.seed}. "
        f"{config.epochs} epochs, batch {config.batch_size}, AdamW lr {config.lr:g} (warmup "
        f"{config.warmup:.0%}, cosine), weight decay {config.weight_decay:g}, label smoothing "
        f"{config.label_smoothing:g}, class balance `{config.balance}` "
        f"(power {config.balance_power:g}). Loss on the answer tokens only. Augmentation: "
        f"{_describe_augment(config.augment)}. Wall time {wall / 60:.1f} min.",
        "",
        "| epoch | train loss | train acc | val acc | val macro-F1 |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['epoch']}{' *' if r['epoch'] == best['epoch'] else ''} | {r['train_loss']:.4f} "
        f"| {r['train_accuracy']:.4f} | {r['val_accuracy']:.4f} | {r['val_macro_f1']:.4f} |"
        for r in history
    ]
    lines += [
        "",
        f"## Evaluation (validation split, {report['images']} images, through EmotionEngine)",
        "",
        f"Accuracy **{report['accuracy']:.4f}**, macro-F1 **{report['macro_f1']:.4f}**; "
        f"{report['engine_images_per_s']:.0f} faces/s on {report['threads']} CPU threads "
        f"(batch {report['engine_batch_size']}, decoded faces, model only). Best epoch "
        f"{best['epoch']} was chosen on this split, so the numbers are slightly optimistic.",
        "",
        "| label | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |"
        for label, v in report["per_class"].items()
    ]
    lines += [
        "",
        "## Use",
        "",
        "Point the worker at this folder (`model.path`); the default labels and prompt "
        "apply"
        + (
            ""
            if tuple(config.labels) == _default_labels()
            else f" only if set to labels {list(config.labels)}"
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def _data_note(name: str, data: Path) -> list[str]:
    """Where --data of the Reproduce command comes from, when it is not in the repository."""
    if _repo_relative(data) is not None:
        return []
    note = (
        f"`{DATA_PLACEHOLDER}` is FER-2013's training folder, one folder per class (the "
        'Kaggle dataset "emotion-detection-fer"); it is not part of the repository.'
    )
    if name == SHIPPED_MODEL:
        note += (
            " From the repository root, `make model FER=<folder>` (or FER2013_TRAIN=<folder>) "
            f"runs the same settings into models/{name}, then evaluates it."
        )
    return [note, ""]


def _front_matter(
    name: str, base: str | None, config: TrainConfig, report: dict[str, Any]
) -> list[str]:
    """The card's Hugging Face metadata (YAML between --- lines), with model-index results."""
    split = f"{config.val_fraction:.0%} stratified validation split of the training set"
    lines = [
        "---",
        "license: apache-2.0",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        "language:",
        "- en",
        "datasets:",
        "- fer2013",
        "tags:",
        *[f"- {tag}" for tag in CARD_TAGS],
        f"base_model: {_yaml_string(base)}" if base else "# no base_model: trained from scratch",
        "model-index:",
        f"- name: {_yaml_string(name)}",
        "  results:",
        "  - task:",
        "      type: image-classification",
        "      name: Facial expression recognition",
        "    dataset:",
        "      type: fer2013",
        f"      name: {_yaml_string(f'FER-2013 ({split}, seed {config.seed})')}",
        "      split: validation",
        "    metrics:",
        "    - type: accuracy",
        f"      value: {report['accuracy']}",
        "      name: Validation accuracy",
        "    - type: f1",
        f"      value: {report['macro_f1']}",
        "      name: Validation macro-F1",
        "      args:",
        "        average: macro",
        "---",
        "",
    ]
    return lines


def _yaml_string(text: str) -> str:
    """A YAML scalar: plain for names such as org/model-1.5, else a double-quoted string
    (JSON's string syntax is valid YAML)."""
    return text if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]*", text) else json.dumps(text)


def _base_model_id(init: Path) -> str:
    """A portable name of the checkpoint a fine-tune started from (never a local path).

    A Hugging Face cache snapshot (.../models--org--name/snapshots/<hash>) gives "org/name";
    a hub id given as --init ("org/name", not a local folder) is kept; a local folder gives
    its name.
    """
    for part in reversed(init.parts):
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    if not init.is_absolute() and len(init.parts) == 2 and not init.exists():
        return init.as_posix()
    return init.name


def _repo_relative(path: Path) -> str | None:
    """`path` relative to the repository root when it lies inside it, else None."""
    repo = Path(__file__).resolve().parents[2]
    try:
        return path.expanduser().resolve().relative_to(repo).as_posix()
    except ValueError:
        return None


def _portable_data(data: Path) -> str:
    """--data as the card names it: a folder of the repository (data/faces) as it is,
    anything else (the machine's FER-2013 copy) as a placeholder."""
    return _repo_relative(data) or DATA_PLACEHOLDER


def _portable_command(command: str, name: str, base: str | None) -> str:
    """The run's command line without this machine's paths: --data as _portable_data,
    --out as models/<name>, --init as the base model's id."""
    try:
        words = shlex.split(command)
    except ValueError:
        return "emotion-worker train ..."
    replace: dict[str, Callable[[Path], str]] = {
        "--data": _portable_data,
        "--out": lambda _: f"models/{name}",
        "--init": lambda path: base or path.name,
    }
    result: list[str] = []
    pending: str | None = None
    for word in words:
        flag, eq, value = word.partition("=")
        if pending is not None:
            result.append(replace[pending](Path(word)))
            pending = None
        elif word in replace:
            result.append(word)
            pending = word
        elif eq and flag in replace:
            result.append(f"{flag}={replace[flag](Path(value))}")
        else:
            result.append(word)
    # Placeholders such as <FER-2013 train folder> stay readable (not shell-quoted).
    return " ".join(w if w.startswith("<") or not w else shlex.quote(w) for w in result)


def write_model_card_from_records(folder: Path) -> Path:
    """Rewrite folder/README.md from the run's records, without training again.

    Reads training_args.json (settings, counts, wall time, best epoch), train_log.jsonl
    (the per-epoch table) and eval_report.json (the engine's evaluation) that
    `emotion-worker train` left in the folder, and writes the card the current
    `_write_model_card` would have written at the end of that run. For cards of models
    trained before a change of the card's format, e.g.

        python -c "from pathlib import Path; from consumer.training.loop import \\
            write_model_card_from_records as w; w(Path('models/llava-fer-small'))"

    The card is named after `folder` (the run's --out may have been elsewhere).
    """
    from dataclasses import fields

    args = json.loads((folder / "training_args.json").read_text(encoding="utf-8"))
    if args.get("status") != "finished":
        raise ValueError(f"{folder}/training_args.json is not of a finished run")
    history = [
        json.loads(line)
        for line in (folder / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    report = json.loads((folder / "eval_report.json").read_text(encoding="utf-8"))
    settings = {f.name: args[f.name] for f in fields(TrainConfig) if f.name in args}
    augment: dict[str, Any] = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in settings.pop("augment").items()
    }
    config = TrainConfig(
        **{
            **settings,
            "data": Path(settings["data"]),
            "out": folder,
            "labels": tuple(settings["labels"]),
            "init": Path(settings["init"]) if settings.get("init") else None,
            "augment": Augment(**augment),
        }
    )
    (best,) = [record for record in history if record["epoch"] == args["best_epoch"]]
    _write_model_card(folder, config, args, history, best, report, float(args["wall_time_s"]))
    return folder / "README.md"


def _default_labels() -> tuple[str, ...]:
    from consumer.config import FER_LABELS

    return FER_LABELS


def _describe_augment(augment: Augment) -> str:
    if augment == NO_AUGMENT:
        return "none"
    parts = [
        f"random resized crop (area {augment.scale[0]:g}-{augment.scale[1]:g})",
        f"flip p={augment.flip:g}",
        f"rotation +-{augment.degrees:g} deg",
        f"brightness/contrast +-{augment.brightness:g}/{augment.contrast:g}",
    ]
    if augment.erase:
        parts.append(f"random erasing p={augment.erase:g}")
    return ", ".join(parts)


def describe_command(argv: Sequence[str]) -> str:
    """The command line of this run as one shell-quoted string."""
    return shlex.join(["emotion-worker", "train", *argv])


__all__ = [
    "TrainConfig",
    "TrainResult",
    "answer_loss",
    "describe_command",
    "evaluate_checkpoint",
    "predict",
    "render_model_card",
    "train",
    "vocab_weights",
    "write_model_card_from_records",
]
