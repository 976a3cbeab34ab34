"""`emotion-worker eval`: score a LLaVA checkpoint on a labelled image folder.

The images go through exactly what the worker does with a pre-cropped face: the same
decoder (consumer.decode.images.decode_image: format allow-list, EXIF orientation, RGB), the whole
image as the face (faces.detector = "none"), and the same EmotionEngine with the same
ModelSettings (prompt, answer words, preprocessing, dtype, compilation). So the accuracy
reported here is the accuracy the worker would have on these faces, not that of a
separate evaluation path that could drift from it.

The folder has the Kaggle FER-2013 layout: one sub-folder per class, named after a label
of the model (or mapped to one with --class-map). A split file (JSON list, JSON object of
lists such as the trainer's split.json {"train": [...], "val": [...]}, or a text file with
one path per line) restricts the run to exactly those paths, relative to --data.

Outputs, in --out: report.json (for machines), report.md (for people),
confusion_matrix.png, reliability.png and predictions.jsonl (one line per image, so any
other metric can be computed later without running the model again).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from consumer.config import ConfigError, ModelSettings, WorkerSettings, load_settings
from consumer.eval.report import (
    ECE_BINS,
    checkpoint_identity,
    compute_metrics,
    write_json,
    write_markdown,
)

PROG = "emotion-worker eval"
DEFAULT_BATCH_SIZE = 32
REPORT_FILES = {
    "json": "report.json",
    "markdown": "report.md",
    "confusion_matrix": "confusion_matrix.png",
    "reliability": "reliability.png",
    "predictions": "predictions.jsonl",
}
# Undecodable images are skipped and listed; the report keeps the first ones by name.
_SKIPPED_LISTED = 50


class EvalError(Exception):
    """A mistake in the inputs (data folder, split file, labels); exit code 2."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One labelled image: its path, its path relative to --data, and its true label."""

    path: Path
    relative: str
    label: str


def build_parser() -> argparse.ArgumentParser:
    """The flags of `emotion-worker eval` (cli.py hands over everything after `eval`)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a LLaVA checkpoint on a labelled image folder (one folder per "
        "class) through the worker's engine; writes report.json, report.md, "
        "confusion_matrix.png, reliability.png and predictions.jsonl.",
    )
    parser.add_argument(
        "--model", type=Path, help="checkpoint folder (default: model.path of --config)"
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="labelled folder: DATA/<class>/<image>"
    )
    parser.add_argument("--out", type=Path, required=True, help="report folder (created)")
    parser.add_argument(
        "--limit", type=int, help="at most N images in all (a seeded random sample)"
    )
    parser.add_argument(
        "--per-class", type=int, help="at most N images per class (a seeded random sample)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"faces per engine call (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        help="torch.compile as in the worker (default: the config's, i.e. auto = CUDA only)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --limit/--per-class")
    parser.add_argument(
        "--split-file",
        type=Path,
        help="evaluate exactly these paths (relative to --data): a JSON list, a JSON object "
        "of lists (e.g. the trainer's split.json), or a text file with one path per line",
    )
    parser.add_argument("--split", help="which list of a JSON-object split file (default: val)")
    parser.add_argument(
        "--labels",
        help="comma-separated model labels, in the model's order (default: model.labels, "
        "i.e. the FER labels)",
    )
    parser.add_argument(
        "--class-map",
        action="append",
        default=[],
        metavar="FOLDER=LABEL",
        help="take folder FOLDER as label LABEL (repeatable, or comma-separated), e.g. "
        "disgust=disgusted for Kaggle's original folder names",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help="worker TOML config: the model settings (prompt, answer_words, labels, dtype, "
        "preprocess...) come from it, as in `emotion-worker run`",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    return parser


def main(argv: list[str]) -> int:
    """Entry point of `emotion-worker eval`; returns the exit code (2: bad inputs)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2) as exit codes
        return exc.code if isinstance(exc.code, int) else 2
    try:
        report = evaluate(args, list(argv))
    except ConfigError as exc:  # also the engine's ModelLoadError
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        return 2
    except EvalError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(summary_line(report, args.out))
    return 0


def summary_line(report: dict[str, Any], out: Path) -> str:
    """The one line printed at the end of a run."""
    m = report["metrics"]
    t = report["timing"]
    return (
        f"{m['count']} images: accuracy {100 * m['accuracy']:.2f}%, "
        f"macro-F1 {m['macro_f1']:.4f}, ECE {m['calibration']['ece']:.4f}, "
        f"{t['engine_images_per_s']:.1f} images/s (engine), "
        f"{t['end_to_end_images_per_s']:.1f} images/s (end to end) -> "
        f"{out / REPORT_FILES['markdown']}"
    )


# ---- inputs ------------------------------------------------------------------------------


def parse_class_map(entries: Sequence[str]) -> dict[str, str]:
    """{folder: label} from "FOLDER=LABEL" entries (each may hold several, comma-separated)."""
    mapping: dict[str, str] = {}
    for entry in entries:
        for item in filter(None, (part.strip() for part in entry.split(","))):
            folder, sep, label = item.partition("=")
            if not sep or not folder.strip() or not label.strip():
                raise EvalError(f"--class-map entry {item!r} is not FOLDER=LABEL")
            mapping[folder.strip()] = label.strip()
    return mapping


def read_split(path: Path, split: str | None) -> list[str]:
    """The relative paths a split file lists, in order, without duplicates.

    JSON files hold a list of paths or an object of lists ({"train": [...], "val": [...]},
    what the trainer writes); `split` picks the list and defaults to "val". Any other file
    is text: one path per line, blank lines and lines starting with "#" ignored.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"split file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(f"split file {path} cannot be read: {exc}") from None
    entries: Any
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        try:
            entries = json.loads(text)
        except ValueError as exc:
            raise EvalError(f"split file {path} is not valid JSON: {exc}") from None
        if isinstance(entries, dict):
            key = split or "val"
            if key not in entries:
                raise EvalError(
                    f"split file {path} has no list {key!r}; it has {sorted(entries)} "
                    "(choose one with --split)"
                )
            entries = entries[key]
        elif split is not None:
            raise EvalError(f"split file {path} is a plain list; --split {split} does not apply")
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise EvalError(f"split file {path}: the split must be a list of path strings")
    else:
        if split is not None:
            raise EvalError(f"split file {path} is a text file; --split {split} does not apply")
        entries = [line.strip() for line in text.splitlines()]
        entries = [line for line in entries if line and not line.startswith("#")]
    if not entries:
        raise EvalError(f"split file {path} lists no images")
    return list(dict.fromkeys(entries))


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _folder_images(data: Path) -> dict[str, list[Path]]:
    """{class folder name: its images, sorted}; hidden files and folders are ignored."""
    from consumer.event_source import IMAGE_SUFFIXES

    found: dict[str, list[Path]] = {}
    for entry in sorted(data.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found[entry.name] = sorted(
                p
                for p in entry.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
                and p.is_file()
                and not _is_hidden(p.relative_to(data))
            )
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            raise EvalError(
                f"image {entry} lies directly in {data}, outside any class folder; the data "
                "folder must hold one folder per class (DATA/<class>/<image>)"
            )
    return found


def _label_of(folder: str, labels: Sequence[str], class_map: dict[str, str], data: Path) -> str:
    label = class_map.get(folder, folder)
    if label not in labels:
        via = f" (mapped to {label!r} by --class-map)" if folder in class_map else ""
        raise EvalError(
            f"class folder {folder!r} in {data}{via} is not one of the model's labels "
            f"{list(labels)}; rename the folder, map it with --class-map {folder}=LABEL, "
            "or give the model's labels with --labels"
        )
    return label


def collect_samples(
    data: Path,
    labels: Sequence[str],
    *,
    class_map: dict[str, str] | None = None,
    split_paths: Sequence[str] | None = None,
    per_class: int | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Sample]:
    """The labelled images to evaluate, sorted by relative path.

    --per-class and --limit take seeded random samples (the same seed picks the same faces
    on every machine), not the first files: FER's files are numbered in collection order,
    and the first N of a folder are not a fair sample of it.
    """
    class_map = class_map or {}
    if not data.is_dir():
        from consumer.training.cli import missing_data_message

        raise EvalError(missing_data_message(data, labels))
    by_label: dict[str, list[Sample]] = {}
    if split_paths is None:
        folders = _folder_images(data)
        for folder, paths in folders.items():
            label = _label_of(folder, labels, class_map, data)
            by_label.setdefault(label, []).extend(
                Sample(p, p.relative_to(data).as_posix(), label) for p in paths
            )
    else:
        missing: list[str] = []
        for entry in split_paths:
            path = Path(entry) if Path(entry).is_absolute() else data / entry
            try:
                relative = path.relative_to(data)
            except ValueError:
                raise EvalError(
                    f"split path {entry!r} is not inside the data folder {data}"
                ) from None
            if len(relative.parts) < 2:
                raise EvalError(
                    f"split path {entry!r} is not inside a class folder (expected <class>/<image>)"
                )
            if not path.is_file():
                missing.append(entry)
                continue
            label = _label_of(relative.parts[0], labels, class_map, data)
            by_label.setdefault(label, []).append(Sample(path, relative.as_posix(), label))
        if missing:
            raise EvalError(
                f"{len(missing)} of {len(split_paths)} paths of the split file do not exist under "
                f"{data}, e.g. {missing[:3]}; is --data the folder the split was made from?"
            )
    rng = random.Random(seed)
    picked: list[Sample] = []
    for label in sorted(by_label):
        samples = sorted(by_label[label], key=lambda s: s.relative)
        if per_class is not None and len(samples) > per_class:
            samples = rng.sample(samples, per_class)
        picked.extend(samples)
    if limit is not None and len(picked) > limit:
        picked = rng.sample(picked, limit)
    if not picked:
        raise EvalError(
            f"no images found in {data}"
            + (" for the split" if split_paths is not None else "")
            + "; expected one folder per class holding images (DATA/<class>/*.png)"
        )
    return sorted(picked, key=lambda s: s.relative)


def _settings(args: argparse.Namespace) -> WorkerSettings:
    """The worker's settings (file < environment < these flags), as `emotion-worker run`."""
    model: dict[str, Any] = {}
    if args.model is not None:
        model["path"] = args.model
    for flag in ("device", "dtype", "compile"):
        if getattr(args, flag) is not None:
            model[flag] = getattr(args, flag)
    if args.labels is not None:
        model["labels"] = tuple(part.strip() for part in args.labels.split(",") if part.strip())
    return load_settings(args.config, {"model": model} if model else None)


def _check_args(args: argparse.Namespace) -> None:
    if args.model is None and args.config is None:
        raise EvalError("give the checkpoint with --model (or a --config with model.path)")
    for flag in ("limit", "per_class", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise EvalError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.split is not None and args.split_file is None:
        raise EvalError("--split needs --split-file")


# ---- the run -----------------------------------------------------------------------------


def evaluate(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run the evaluation the flags describe, write the report files, return the report."""
    _check_args(args)
    settings = _settings(args)
    model_settings = settings.model
    class_map = parse_class_map(args.class_map)
    split_paths = read_split(args.split_file, args.split) if args.split_file else None
    samples = collect_samples(
        args.data,
        model_settings.labels,
        class_map=class_map,
        split_paths=split_paths,
        per_class=args.per_class,
        limit=args.limit,
        seed=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)

    from consumer.engine import EmotionEngine  # torch: only once the inputs are known good

    started = time.perf_counter()
    engine = EmotionEngine.load(model_settings, max_batch_size=args.batch_size)
    loaded = time.perf_counter()
    engine.warm_up()
    warmed = time.perf_counter()
    # After the load: the loader has checked that the path is a complete checkpoint folder.
    identity = checkpoint_identity(model_settings.path)
    hashed = time.perf_counter()

    run = _classify_all(engine, samples, args.batch_size, settings, quiet=args.quiet)
    metrics = compute_metrics(
        model_settings.labels, run.truth, run.predicted, run.scores, bins=ECE_BINS
    )
    report = _report(
        args=args,
        argv=argv,
        settings=model_settings,
        engine=engine,
        identity=identity,
        samples=samples,
        run=run,
        metrics=metrics.to_json(),
        timing={
            "load_s": loaded - started,
            "warm_up_s": warmed - loaded,
            "hash_s": hashed - warmed,
            "image_load_s": run.load_s,
            "classify_s": run.classify_s,
            "loop_s": run.loop_s,
            "engine_images_per_s": _rate(len(run.truth), run.classify_s),
            "end_to_end_images_per_s": _rate(len(run.truth), run.loop_s),
        },
    )
    _write_outputs(report, run, args.out, metrics.labels)
    return report


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


@dataclass(slots=True)
class _Run:
    """What the classification loop produced, in sample order (skipped images left out)."""

    relative: list[str]
    truth: list[str]
    predicted: list[str]
    scores: list[list[float]]
    skipped: list[dict[str, str]]
    load_s: float = 0.0
    classify_s: float = 0.0
    loop_s: float = 0.0


def _classify_all(
    engine: Any,
    samples: Sequence[Sample],
    batch_size: int,
    settings: WorkerSettings,
    *,
    quiet: bool,
) -> _Run:
    """Read, decode and classify every sample in batches, timing the two parts apart."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    from consumer.decode.images import decode_image
    from consumer.errors import EventError

    labels: tuple[str, ...] = engine.labels
    run = _Run([], [], [], [], [])
    correct = 0
    loop_start = time.perf_counter()
    with tqdm(
        total=len(samples), unit="img", desc="eval", disable=quiet, dynamic_ncols=True
    ) as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            t0 = time.perf_counter()
            faces = []
            kept: list[Sample] = []
            for sample in batch:
                try:
                    data = sample.path.read_bytes()
                    faces.append(decode_image(data, settings.fetch.max_pixels))
                    kept.append(sample)
                except (EventError, OSError) as exc:  # the worker would dead-letter it
                    run.skipped.append({"path": sample.relative, "error": str(exc)})
            t1 = time.perf_counter()
            results = engine.classify(faces) if faces else []
            t2 = time.perf_counter()
            run.load_s += t1 - t0
            run.classify_s += t2 - t1
            for sample, result in zip(kept, results, strict=True):
                run.relative.append(sample.relative)
                run.truth.append(sample.label)
                run.predicted.append(result.label)
                run.scores.append([result.scores[label] for label in labels])
                correct += result.label == sample.label
            bar.update(len(batch))
            if run.truth:
                bar.set_postfix(acc=f"{correct / len(run.truth):.3f}", refresh=False)
    run.loop_s = time.perf_counter() - loop_start
    if not run.truth:
        raise EvalError(
            f"none of the {len(samples)} images could be decoded, e.g. "
            f"{run.skipped[0]['path']}: {run.skipped[0]['error']}"
        )
    return run


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("emotion-worker", "torch", "transformers", "pillow"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def report_path(path: Path) -> str:
    """A path as the report records it: relative to the current directory when it lies
    inside it (a report made in a checkout names the checkout's files the same way on every
    machine), otherwise as given on the command line (no resolving into this machine's
    absolute layout)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _report(
    *,
    args: argparse.Namespace,
    argv: list[str],
    settings: ModelSettings,
    engine: Any,
    identity: dict[str, Any],
    samples: Sequence[Sample],
    run: _Run,
    metrics: dict[str, Any],
    timing: dict[str, float],
) -> dict[str, Any]:
    device = str(engine.device)
    if engine.device.type == "cuda":
        import torch

        device = f"{device} ({torch.cuda.get_device_name(engine.device)})"
    available = Counter(s.label for s in samples)
    return {
        "schema": "emotion-worker/eval-report/1",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": argv,
        "model": {
            "path": report_path(settings.path),
            "model_id": engine.model_id,
            "identity": identity,
            "device": device,
            "dtype": str(engine.dtype).removeprefix("torch."),
            "compiled": bool(engine.compiled),
            "batch_size": args.batch_size,
            "prompt": engine.prompt_text,
            "settings": settings.model_dump(mode="json"),
        },
        "data": {
            "folder": report_path(args.data),
            "split_file": report_path(args.split_file) if args.split_file else None,
            "split": (args.split or "val") if args.split_file else None,
            "class_map": parse_class_map(args.class_map),
            "seed": args.seed,
            "limit": args.limit,
            "per_class": args.per_class,
            "selected": len(samples),
            "selected_per_label": {label: available[label] for label in settings.labels},
            "images": len(run.truth),
            "skipped_count": len(run.skipped),
            "skipped": run.skipped[:_SKIPPED_LISTED],
        },
        "metrics": metrics,
        "timing": timing,
        "versions": _versions(),
        "files": dict(REPORT_FILES),
    }


def _write_outputs(report: dict[str, Any], run: _Run, out: Path, labels: Sequence[str]) -> None:
    from consumer.eval.plots import write_confusion_matrix, write_reliability

    metrics = report["metrics"]
    name = report["model"]["model_id"]
    with (out / REPORT_FILES["predictions"]).open("w", encoding="utf-8") as handle:
        for relative, truth, predicted, scores in zip(
            run.relative, run.truth, run.predicted, run.scores, strict=True
        ):
            row = {
                "path": relative,
                "true": truth,
                "predicted": predicted,
                "confidence": max(scores),
                "scores": dict(zip(labels, scores, strict=True)),
            }
            handle.write(json.dumps(row) + "\n")
    write_confusion_matrix(
        labels,
        metrics["confusion_matrix"]["counts"],
        out / REPORT_FILES["confusion_matrix"],
        title=f"Confusion matrix: {name} ({metrics['count']} images)",
    )
    from consumer.eval.report import CalibrationBin

    bins = [CalibrationBin(**b) for b in metrics["calibration"]["per_bin"]]
    write_reliability(
        bins,
        metrics["calibration"]["ece"],
        out / REPORT_FILES["reliability"],
        title=f"Reliability: {name}",
    )
    write_markdown(report, out / REPORT_FILES["markdown"])
    write_json(report, out / REPORT_FILES["json"])  # last: its presence means a whole report
