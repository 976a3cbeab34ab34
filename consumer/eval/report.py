"""The report of `emotion-worker eval`: what it records, and the files that carry it.

Outputs, in --out: report.json (for machines), report.md (for people; consumer.eval.markdown),
confusion_matrix.png, reliability.png (consumer.eval.plots) and predictions.jsonl (one line
per image, so any other metric can be computed later without running the model again).
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from consumer.config import ModelSettings
from consumer.eval.classify import Predictions
from consumer.eval.dataset import Sample, parse_class_map
from consumer.eval.markdown import render_markdown
from consumer.eval.metrics import CalibrationBin

REPORT_FILES = {
    "json": "report.json",
    "markdown": "report.md",
    "confusion_matrix": "confusion_matrix.png",
    "reliability": "reliability.png",
    "predictions": "predictions.jsonl",
}
# Undecodable images are skipped and listed; the report keeps the first ones by name.
_SKIPPED_LISTED = 50


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


def build_report(
    *,
    args: argparse.Namespace,
    argv: list[str],
    settings: ModelSettings,
    engine: Any,
    identity: dict[str, Any],
    samples: Sequence[Sample],
    run: Predictions,
    metrics: dict[str, Any],
    timing: dict[str, float],
) -> dict[str, Any]:
    """The report of one run, as report.json holds it (and report.md renders it)."""
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


def write_outputs(
    report: dict[str, Any], run: Predictions, out: Path, labels: Sequence[str]
) -> None:
    """Write every file of REPORT_FILES into `out`, report.json last."""
    # Pillow only once there is a report to draw: --help and bad inputs exit without it.
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
    bins = [CalibrationBin(**b) for b in metrics["calibration"]["per_bin"]]
    write_reliability(
        bins,
        metrics["calibration"]["ece"],
        out / REPORT_FILES["reliability"],
        title=f"Reliability: {name}",
    )
    write_markdown(report, out / REPORT_FILES["markdown"])
    write_json(report, out / REPORT_FILES["json"])  # last: its presence means a whole report


def write_json(report: Mapping[str, Any], path: Path) -> Path:
    """report.json: strict JSON (no NaN), stable key order, written whole then renamed."""
    text = json.dumps(report, indent=2, allow_nan=False, default=str) + "\n"
    write_text(path, text)
    return path


def write_text(path: Path, text: str) -> None:
    """Write `text` whole, then rename: a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def write_markdown(report: Mapping[str, Any], path: Path) -> Path:
    """Write report.md (see render_markdown)."""
    write_text(path, render_markdown(report))
    return path
