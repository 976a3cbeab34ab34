"""`emotion-worker train`: train or fine-tune a LLaVA checkpoint on a labelled face folder.

From scratch (the default) it builds a small LLaVA (CLIP ViT + Llama) that trains on two
CPU cores; with --init it fine-tunes an existing checkpoint, and with --init and --lora it
trains LoRA adapters (peft) on a full-size one, for a GPU. Either way the output folder is a
Hugging Face LLaVA checkpoint (safetensors) that the worker loads as it is, together with
split.json, train_log.jsonl, training_args.json, eval_report.json and a README model card.

The shipped FER model was made with (`make model FER=<folder>`; about an hour on 2 cores):

    emotion-worker train --data <FER-2013 train folder> --out models/llava-fer-small \\
        --from-scratch --arch small --epochs 35 --threads 2 --seed 0

FER-2013 is not part of the repository (see eval.dataset.missing_data_message); the 404 faces in
data/faces are enough for a smoke run.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from consumer.config import DEFAULT_PROMPT, FER_LABELS
from consumer.eval.dataset import missing_data_message


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `emotion-worker train`."""
    from consumer.training.model import ARCHS

    parser = argparse.ArgumentParser(
        prog="emotion-worker train",
        description="Train a LLaVA checkpoint to answer the label word of a face image.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="folder with one subfolder of images per label"
    )
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--init", type=Path, default=None, help="fine-tune this checkpoint (Hugging Face layout)"
    )
    start.add_argument(
        "--from-scratch",
        action="store_true",
        help="build a new small LLaVA of --arch (the default when --init is not given)",
    )
    parser.add_argument("--arch", choices=sorted(ARCHS), default="small")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--lr", type=float, default=None, help="peak learning rate (default 1e-3, LoRA 2e-4)"
    )
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=0.03, help="fraction of all steps")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--image-size",
        type=int,
        default=48,
        help="model input size from scratch; with --init, the size images are stored at "
        "before the checkpoint's processor size is applied",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="use at most N images (stratified; quick runs)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--balance",
        choices=["loss", "sampler", "none"],
        default="loss",
        help="rare classes: class-weighted loss, balanced sampling, or nothing",
    )
    parser.add_argument(
        "--balance-power",
        type=float,
        default=0.5,
        help="class weight (largest/count)**power; 1 = inverse frequency",
    )
    parser.add_argument("--no-augment", action="store_true", help="train on the images as they are")
    parser.add_argument("--erase", type=float, default=0.0, help="random erasing probability")
    parser.add_argument(
        "--select",
        choices=["accuracy", "macro_f1", "last"],
        default="accuracy",
        help="validation metric that picks the saved epoch; last: the last epoch (the "
        "validation split then chooses nothing)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--labels",
        default=",".join(FER_LABELS),
        help="comma-separated labels = class folder names = answer words",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt with <image> and {labels}")
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass (less memory, ~30%% slower)",
    )
    distill = parser.add_argument_group("distillation and calibration")
    distill.add_argument(
        "--teacher",
        type=Path,
        default=None,
        help="work folder of a CNN teacher (consumer/training/teacher.py): reused if it was "
        "trained there on the same faces and settings, else trained on the training part and "
        "stored there; the student then also matches its label distribution",
    )
    distill.add_argument("--teacher-epochs", type=int, default=40)
    distill.add_argument(
        "--distill-weight", type=float, default=1.0, help="weight of the T^2-scaled KL term"
    )
    distill.add_argument("--distill-temperature", type=float, default=2.0)
    distill.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.0,
        help="hold out this stratified fraction of the training part (no model trains on it), "
        "fit a temperature on it and fold it into lm_head; 0: no calibration",
    )
    lora = parser.add_argument_group("LoRA (with --init)")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters, then merge them")
    lora.add_argument("--lora-rank", type=int, default=16)
    lora.add_argument("--lora-alpha", type=int, default=32)
    lora.add_argument("--lora-dropout", type=float, default=0.05)
    lora.add_argument(
        "--lora-projector",
        choices=["full", "lora"],
        default="full",
        help="train the multimodal projector fully, or with adapters too",
    )
    return parser


def main(argv: list[str]) -> int:
    """Entry point of `emotion-worker train`; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        labels = tuple(label.strip() for label in args.labels.split(",") if label.strip())
        if args.lora and args.init is None:
            parser.error("--lora needs --init PATH (the checkpoint to fine-tune)")
        if args.lora and importlib.util.find_spec("peft") is None:
            parser.error(
                "--lora needs peft, which is not installed: pip install 'emotion-worker[train]' "
                "(or pip install peft)"
            )
        if len(labels) < 2:
            parser.error("--labels needs at least two labels")
        if "<image>" not in args.prompt:
            parser.error("--prompt must contain <image>")
        if args.epochs < 1 or args.batch_size < 1:
            parser.error("--epochs and --batch-size must be at least 1")
        if args.teacher is not None and (args.init is not None or args.teacher_epochs < 1):
            parser.error("--teacher trains a model from scratch with --teacher-epochs >= 1")
        if args.distill_temperature <= 0 or args.distill_weight < 0:
            parser.error("--distill-temperature must be > 0 and --distill-weight >= 0")
        if not 0 <= args.calibration_fraction < 0.5:
            parser.error("--calibration-fraction must be in [0, 0.5)")
    except SystemExit as exc:  # --help (0) and usage errors (2) as exit codes
        return exc.code if isinstance(exc.code, int) else 2
    if not args.data.is_dir():  # before torch is imported or anything is written
        print(f"emotion-worker train: {missing_data_message(args.data, labels)}", file=sys.stderr)
        return 2

    from consumer.config import ConfigError
    from consumer.training.config import TrainConfig, describe_command
    from consumer.training.dataset import NO_AUGMENT, Augment, DatasetError
    from consumer.training.loop import train

    augment = NO_AUGMENT if args.no_augment else Augment(erase=args.erase)
    config = TrainConfig(
        data=args.data,
        out=args.out,
        labels=labels,
        prompt=args.prompt,
        init=args.init,
        arch=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else (2e-4 if args.lora else 1e-3),
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        label_smoothing=args.label_smoothing,
        val_fraction=args.val_fraction,
        seed=args.seed,
        image_size=args.image_size,
        limit=args.limit,
        threads=args.threads,
        balance=args.balance,
        balance_power=args.balance_power,
        augment=augment,
        select=args.select,
        device=args.device,
        lora=args.lora,
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_projector=args.lora_projector,
        gradient_checkpointing=args.gradient_checkpointing,
        command=describe_command(argv),
        teacher=args.teacher,
        teacher_epochs=args.teacher_epochs,
        distill_weight=args.distill_weight,
        distill_temperature=args.distill_temperature,
        calibration_fraction=args.calibration_fraction,
    )
    try:
        train(config)
    except (DatasetError, ConfigError) as exc:  # ModelLoadError is a ConfigError
        print(f"emotion-worker train: {exc}", file=sys.stderr)
        return 2
    return 0
