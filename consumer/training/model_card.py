"""The model card (README.md) of a trained checkpoint: Hugging Face metadata, intended use,
limitations, licence, how to reproduce the run and its numbers; written at the end of
`train`, or later from the records a run leaves in its folder (as the shipped card is).
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from consumer.training.config import TrainConfig
from consumer.training.dataset import Augment
from consumer.training.distill import card_lines
from consumer.training.model import ARCHS
from consumer.training.provenance import REPO

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


def write_model_card(
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
    """The text of the model card of checkpoint `name` (see write_model_card)."""
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
        f"{config.augment.describe()}. Wall time {wall / 60:.1f} min.",
        *card_lines(config, args),
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
        f"(batch {report['engine_batch_size']}, decoded faces, model only). "
        + (
            "The last epoch is kept: this split chose nothing."
            if config.select == "last"
            else f"Best epoch {best['epoch']} was chosen on this split, so the numbers are "
            "slightly optimistic."
        ),
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
    try:
        return path.expanduser().resolve().relative_to(REPO).as_posix()
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
        "--teacher": lambda _: ".cache/teacher",
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
    `write_model_card` would have written at the end of that run. For cards of models
    trained before a change of the card's format, e.g.

        python -c "from pathlib import Path; from consumer.training.model_card import \\
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
            "teacher": Path(settings["teacher"]) if settings.get("teacher") else None,
            "augment": Augment(**augment),
        }
    )
    (best,) = [record for record in history if record["epoch"] == args["best_epoch"]]
    write_model_card(folder, config, args, history, best, report, float(args["wall_time_s"]))
    return folder / "README.md"


def _default_labels() -> tuple[str, ...]:
    from consumer.config import FER_LABELS

    return FER_LABELS
