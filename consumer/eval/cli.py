"""`emotion-worker eval`: score a LLaVA checkpoint on a labelled image folder.

The flags and the exit codes; consumer.eval.evaluate runs what they describe. The whole
command: consumer.eval.dataset picks the labelled images, consumer.eval.classify runs the
worker's decoder and engine over them, consumer.eval.metrics scores the answers and
consumer.eval.report writes the report files. `--compare A B` (consumer.eval.compare) runs
that twice, once per model setting, and compares the two.

Exit codes: 0 the report (or comparison) was written, whatever the numbers say; 2 bad
inputs: a flag, a setting (config file, environment, a side of --compare), the data folder
or split file, or a checkpoint that cannot be loaded with the settings given (with
--compare, side A's report may already be in --out when B fails to load); 1 anything
unexpected (with a traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from consumer.config import ConfigError
from consumer.eval.dataset import EvalError
from consumer.eval.evaluate import evaluate
from consumer.eval.report import REPORT_FILES

PROG = "emotion-worker eval"
DEFAULT_BATCH_SIZE = 32


def build_parser() -> argparse.ArgumentParser:
    """The flags of `emotion-worker eval` (cli.py hands over everything after `eval`)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Evaluate a LLaVA checkpoint on a labelled image folder (one folder per "
        "class) through the worker's engine; writes report.json, report.md, "
        "confusion_matrix.png, reliability.png and predictions.jsonl. With --compare A B: "
        "two model settings over the same faces, side by side. Exit codes: 0 written, 2 bad "
        "inputs or a model that cannot be loaded, 1 an unexpected failure.",
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
    parser.add_argument(
        "--tta",
        choices=["none", "flip"],
        help="test-time augmentation as model.tta (default: the config's, i.e. none)",
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
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="run two model settings over the same faces and compare them: label agreement, "
        "score differences, accuracy and speed of each. A side is a comma-separated list "
        "of KEY=VALUE model settings on top of the config and flags, e.g. --compare "
        "dtype=float32 dtype=bfloat16, or path=models/a path=models/b, or '' for the "
        "settings as configured; values that are lists or hold commas are JSON "
        '(answer_words=["a","b"], prompt="..."). Writes a/ and b/ (a normal report each), '
        "compare.json and compare.md",
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
        if args.compare is not None:
            from consumer.eval.compare import compare

            summary = compare_summary(compare(args, list(argv)), args.out)
        else:
            summary = summary_line(evaluate(args, list(argv)), args.out)
    except ConfigError as exc:  # also the engine's ModelLoadError
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        return 2
    except EvalError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(summary)
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


def compare_summary(comparison: dict[str, Any], out: Path) -> str:
    """The lines printed at the end of `eval --compare`: one per side, then the agreement."""
    lines = []
    for name, side in comparison["sides"].items():
        speed = side["speed"]
        lines.append(
            f"{name} ({side['spec'] or 'as configured'}): "
            f"accuracy {100 * side['metrics']['accuracy']:.2f}%, "
            f"{speed['engine_images_per_s']:.1f} images/s, "
            f"{speed['median_batch_ms']:.1f} ms per batch (median), "
            f"warm-up {speed['warm_up_s']:.2f} s"
        )
    agreement, scores = comparison["agreement"], comparison["scores"]
    lines.append(
        f"{comparison['faces']} faces: same label {100 * agreement['rate']:.2f}% "
        f"({agreement['agree']}/{comparison['faces']}), score difference max "
        f"{scores['max_abs_diff']:.4f} mean {scores['mean_abs_diff']:.6f} -> "
        f"{out / comparison['files']['markdown']}"
    )
    return "\n".join(lines)
