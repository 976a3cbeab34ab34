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
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (torch's convention)

from consumer.training.config import TrainConfig, TrainResult
from consumer.training.dataset import (
    Example,
    Normalizer,
    Split,
    class_counts,
    load_pixels,
    scan_folder,
    stratified_split,
    subsample,
)
from consumer.training.distill import calibrate, prepare_teacher, teacher_summary
from consumer.training.loss import answer_loss, class_weights, distillation_loss, vocab_weights
from consumer.training.metrics import classification_report
from consumer.training.model import (
    ARCHS,
    AnswerFormat,
    build_scratch_model,
    init_vision_tower,
    load_init_model,
    save_checkpoint,
)
from consumer.training.model_card import write_model_card
from consumer.training.optim import EpochOrder, lr_lambda, param_groups
from consumer.training.probe import VisionProbe
from consumer.training.provenance import git_commit, library_versions
from consumer.training.resume import Progress, clear_state, load_state, save_state
from consumer.training.teacher import (
    teacher_logits,
)
from consumer.training.validation import evaluate_checkpoint, predict


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
    calibration: list[Example] = []
    if config.calibration_fraction > 0:
        # Carved out of the training part, so the validation faces stay exactly those of a
        # run without calibration (the demo's faces stay unseen).
        inner = stratified_split(split.train, config.calibration_fraction, config.seed)
        split, calibration = Split(train=inner.train, val=split.val), inner.val
    _write_json(
        out / "split.json",
        {
            "seed": config.seed,
            **split.to_json(),
            **({"calibration": [e.path for e in calibration]} if calibration else {}),
        },
    )
    emit(
        f"data: {len(examples)} images, {len(split.train)} train / {len(split.val)} val"
        + (f" / {len(calibration)} calibration" if calibration else "")
        + f" ({_counts_by_label(split.train, config.labels)})"
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
    # On a GPU the forward runs in bfloat16 (float32 master weights); on a CPU float32: the
    # small ViT's matrices are too small for bf16 units to pay for the casts (measured).
    autocast = device.type == "cuda"
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
    teacher = None
    if config.teacher is not None:
        teacher = prepare_teacher(
            config, split.train, train_pixels, train_targets, val_pixels, val_targets, device, emit
        )
        if not fmt.first_tokens_unique:
            raise ValueError(
                "distillation needs labels whose answers start with distinct tokens (the "
                "teacher's distribution is matched on the first answer token); choose "
                "--labels whose words tokenize to different first tokens, or drop --teacher"
            )
    trained = [p for p in model.parameters() if p.requires_grad]
    if probe is not None:
        trained += list(probe.parameters())
    order = EpochOrder(train_targets, config.balance, config.balance_power, config.seed)
    # The faces stay where the model is: on a GPU, augmentation and normalisation then run
    # there too (66 MB of uint8), and no batch crosses the PCIe bus.
    train_pixels = train_pixels.to(device)
    augment_generator = torch.Generator().manual_seed(config.seed + 1)
    steps_per_epoch = math.ceil(len(split.train) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    groups = param_groups(model, config.weight_decay)
    if probe is not None:
        groups += param_groups(probe, config.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))
    warmup_steps = max(1, round(total_steps * config.warmup))
    schedule = lr_lambda(total_steps, warmup_steps, config.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

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
        "git": git_commit(),
        "versions": library_versions(config.lora),
        "started_at": started_at,
    }
    _write_json(out / "training_args.json", {**args, "status": "running"})
    log_file = out / "train_log.jsonl"

    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    best_state: dict[str, torch.Tensor] | None = None
    train_seconds = 0.0
    seen = 0
    global_step = 0
    # LoRA runs are short and GPU-only; the state of a from-scratch or full run is kept.
    modules: dict[str, torch.nn.Module] = {"model": model}
    if probe is not None:
        modules["probe"] = probe
    generators = {"order": order.generator, "augment": augment_generator}
    settings = config.to_json()
    resumed, why = (
        load_state(out, settings, modules, optimizer, generators)
        if peft_model is None
        else (None, "")
    )
    if why:
        emit(why)
    if resumed is not None:
        history, best = resumed.history, resumed.best
        train_seconds, seen, global_step = resumed.train_seconds, resumed.seen, resumed.global_step
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * schedule(global_step)
        scheduler.last_epoch = global_step
    log_file.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")
    for epoch in range(len(history) + 1, config.epochs + 1):
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
            faces = config.augment(train_pixels[batch], augment_generator)
            pixels = normalize(faces)
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
            if teacher is not None:
                # Online: the teacher sees the very augmented view the student sees.
                with torch.no_grad():
                    soft = teacher_logits(teacher, faces, device)
                total = total + config.distill_weight * distillation_loss(
                    scores, soft.to(device), config.distill_temperature
                )
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
            correct += int((scores.detach().argmax(dim=1).cpu() == targets).sum())
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
        improved = (
            best is None
            or config.select == "last"
            or report[config.select] > best[f"val_{config.select}"]
        )
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
        if peft_model is None:
            progress = Progress(epoch, global_step, history, best, train_seconds, seen)
            save_state(out, settings, progress, modules, optimizer, generators)
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

    calibrated = (
        calibrate(out, config, calibration, normalize, fmt, device, emit) if calibration else None
    )
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
    args = {
        **args,
        "status": "finished",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_time_s": round(wall, 1),
        "train_images_per_s": round(images_per_s, 1),
        "best_epoch": best["epoch"],
        "best_val": {k: best[k] for k in ("val_accuracy", "val_macro_f1")},
        "calibration": calibrated,
        "resumed_after_epoch": resumed.epoch if resumed is not None else None,
        "teacher_summary": teacher_summary(config.teacher),
    }
    _write_json(out / "training_args.json", args)
    # The card reads the finished record (teacher, temperature), as a card rebuilt from it.
    write_model_card(out, config, args, history, best, eval_report, wall)
    clear_state(out)  # only now: a run that fails after its last epoch resumes there
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
