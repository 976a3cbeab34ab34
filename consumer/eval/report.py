"""The numbers of `emotion-worker eval`, and the report files that carry them.

Everything here is a pure function of (true labels, predicted labels, score vectors) or of
files on disk, so the metrics can be checked on hand-made inputs without a model, and the
report of a run can be recomputed from its predictions.jsonl.

Conventions (the same as scikit-learn's defaults, so numbers are comparable with it):

* precision of a class that is never predicted, and recall of a class with no examples,
  are 0.0 (no division by zero, no NaN in the JSON);
* macro averages run over the labels that occur in the truth or in the predictions; a
  label absent from both (a class missing from a validation split and never guessed)
  says nothing about the model and would only drag the average towards 0;
* the expected calibration error (Guo et al., 2017) uses equal-width bins over the
  confidence, i.e. the probability of the predicted label; bin i holds confidences in
  (i/B, (i+1)/B], with a confidence of exactly 0 in the first bin.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ECE_BINS = 15
# Probabilities are clipped here before the log: a softmax in float64 can round a label's
# probability to exactly 0, and one such face would make the mean NLL infinite.
NLL_FLOOR = 1e-12


class EvalInputError(ValueError):
    """Inputs to the metrics do not fit together (lengths, unknown labels, empty)."""


@dataclass(frozen=True, slots=True)
class ClassMetrics:
    """One label's row of the per-class table."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int  # examples whose true label this is
    predicted: int  # examples predicted as this label


@dataclass(frozen=True, slots=True)
class CalibrationBin:
    """One bar of the reliability diagram; accuracy and confidence are None when empty."""

    lower: float
    upper: float
    count: int
    accuracy: float | None
    confidence: float | None


@dataclass(frozen=True, slots=True)
class Calibration:
    """Expected (count-weighted) and maximum calibration error over equal-width bins."""

    ece: float
    mce: float
    bins: tuple[CalibrationBin, ...]


@dataclass(frozen=True, slots=True)
class EvalMetrics:
    """Everything the report says about the predictions; `confusion[i][j]` counts true i
    predicted as j, in the order of `labels`."""

    labels: tuple[str, ...]
    count: int
    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    top2_accuracy: float
    nll: float
    brier: float
    majority_baseline: float
    per_class: tuple[ClassMetrics, ...]
    confusion: tuple[tuple[int, ...], ...]
    calibration: Calibration

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; per_class keyed by label for easy lookups."""
        data = asdict(self)
        data["labels"] = list(self.labels)
        data["per_class"] = {row.label: _without(asdict(row), "label") for row in self.per_class}
        data["confusion_matrix"] = {
            "rows": "true label",
            "columns": "predicted label",
            "labels": list(self.labels),
            "counts": [list(row) for row in self.confusion],
        }
        del data["confusion"]
        data["calibration"] = {
            "bins": len(self.calibration.bins),
            "ece": self.calibration.ece,
            "mce": self.calibration.mce,
            "per_bin": [asdict(b) for b in self.calibration.bins],
        }
        return data


def _without(data: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != key}


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or 0.0 when the denominator is 0 (sklearn's zero_division)."""
    return numerator / denominator if denominator else 0.0


def confusion_matrix(
    labels: Sequence[str], truth: Sequence[str], predicted: Sequence[str]
) -> list[list[int]]:
    """Counts with rows = true label, columns = predicted label, both in `labels` order."""
    _check_lengths(truth, predicted)
    index = _index(labels)
    matrix = [[0] * len(labels) for _ in labels]
    for true, pred in zip(truth, predicted, strict=True):
        matrix[_lookup(index, true, "true")][_lookup(index, pred, "predicted")] += 1
    return matrix


def per_class_metrics(labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> list[ClassMetrics]:
    """Precision, recall and F1 of every label from a confusion matrix (rows true)."""
    rows: list[ClassMetrics] = []
    for i, label in enumerate(labels):
        hits = matrix[i][i]
        support = sum(matrix[i])
        predicted = sum(row[i] for row in matrix)
        precision = _ratio(hits, predicted)
        recall = _ratio(hits, support)
        rows.append(
            ClassMetrics(
                label=label,
                precision=precision,
                recall=recall,
                f1=_ratio(2 * precision * recall, precision + recall),
                support=support,
                predicted=predicted,
            )
        )
    return rows


def calibration(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS
) -> Calibration:
    """ECE and MCE over `bins` equal-width confidence bins, with each bin's reliability."""
    _check_lengths(confidences, correct)
    if bins < 1:
        raise EvalInputError(f"calibration needs at least one bin, got {bins}")
    counts = [0] * bins
    conf_sums = [0.0] * bins
    hit_sums = [0] * bins
    for confidence, hit in zip(confidences, correct, strict=True):
        if not 0.0 <= confidence <= 1.0 or math.isnan(confidence):
            raise EvalInputError(f"confidence {confidence} is not a probability")
        # (i/B, (i+1)/B]: ceil(c*B) - 1, with 0 in the first bin. The epsilon keeps an edge
        # such as 2/15, whose product with 15 rounds to 2.0000000000000004, in its own bin.
        b = min(max(math.ceil(confidence * bins - 1e-9) - 1, 0), bins - 1)
        counts[b] += 1
        conf_sums[b] += confidence
        hit_sums[b] += int(hit)
    total = sum(counts)
    table: list[CalibrationBin] = []
    ece = 0.0
    mce = 0.0
    for b in range(bins):
        accuracy = hit_sums[b] / counts[b] if counts[b] else None
        mean_conf = conf_sums[b] / counts[b] if counts[b] else None
        if accuracy is not None and mean_conf is not None:
            gap = abs(accuracy - mean_conf)
            ece += gap * counts[b] / total
            mce = max(mce, gap)
        table.append(CalibrationBin(b / bins, (b + 1) / bins, counts[b], accuracy, mean_conf))
    return Calibration(ece=ece, mce=mce, bins=tuple(table))


def compute_metrics(
    labels: Sequence[str],
    truth: Sequence[str],
    predicted: Sequence[str],
    scores: Sequence[Sequence[float]],
    *,
    bins: int = ECE_BINS,
) -> EvalMetrics:
    """All metrics of one evaluation.

    `scores[k]` holds example k's probability of every label, in `labels` order; the
    confidence of an example is the probability of its predicted label (the engine's
    FaceScores.confidence, which is the largest one).
    """
    if not truth:
        raise EvalInputError("no examples to evaluate")
    _check_lengths(truth, predicted)
    _check_lengths(truth, scores)
    index = _index(labels)
    for row in scores:
        if len(row) != len(labels):
            raise EvalInputError(f"a score vector has {len(row)} entries for {len(labels)} labels")
    matrix = confusion_matrix(labels, truth, predicted)
    rows = per_class_metrics(labels, matrix)
    count = len(truth)
    present = [row for row in rows if row.support or row.predicted]
    top2 = 0
    nll = 0.0
    brier = 0.0
    confidences: list[float] = []
    for true, pred, row in zip(truth, predicted, scores, strict=True):
        t = index[true]
        ranked = sorted(range(len(row)), key=lambda i: (-row[i], i))
        top2 += t in ranked[:2]
        nll -= math.log(max(row[t], NLL_FLOOR))
        brier += sum((p - (i == t)) ** 2 for i, p in enumerate(row))
        confidences.append(row[index[pred]])
    correct = [t == p for t, p in zip(truth, predicted, strict=True)]
    return EvalMetrics(
        labels=tuple(labels),
        count=count,
        accuracy=sum(correct) / count,
        macro_precision=sum(r.precision for r in present) / len(present),
        macro_recall=sum(r.recall for r in present) / len(present),
        macro_f1=sum(r.f1 for r in present) / len(present),
        top2_accuracy=top2 / count,
        nll=nll / count,
        brier=brier / count,
        majority_baseline=max(r.support for r in rows) / count,
        per_class=tuple(rows),
        confusion=tuple(tuple(row) for row in matrix),
        calibration=calibration(confidences, correct, bins),
    )


def _check_lengths(first: Sequence[Any], second: Sequence[Any]) -> None:
    if len(first) != len(second):
        raise EvalInputError(f"length mismatch: {len(first)} vs {len(second)}")


def _index(labels: Sequence[str]) -> dict[str, int]:
    index = {label: i for i, label in enumerate(labels)}
    if len(index) != len(labels):
        raise EvalInputError(f"labels have duplicates: {list(labels)}")
    return index


def _lookup(index: Mapping[str, int], label: str, kind: str) -> int:
    try:
        return index[label]
    except KeyError:
        raise EvalInputError(
            f"{kind} label {label!r} is not one of the labels {list(index)}"
        ) from None


# ---- checkpoint identity -----------------------------------------------------------------


# Files of a checkpoint folder that describe a model rather than make it: the model card(s)
# and the records `emotion-worker train` writes beside the weights. They are left out of the
# identity (see checkpoint_identity).
NOT_MODEL_FILES = frozenset(
    {"training_args.json", "train_log.jsonl", "split.json", "eval_report.json"}
)
IDENTITY_EXCLUDES = "dot-files, *.md, " + ", ".join(sorted(NOT_MODEL_FILES)) + " excluded"


def is_model_file(relative: Path) -> bool:
    """Whether a file (path relative to the checkpoint folder) counts in the identity."""
    if any(part.startswith(".") for part in relative.parts):
        return False
    return relative.suffix.lower() != ".md" and relative.name not in NOT_MODEL_FILES


def checkpoint_identity(folder: Path) -> dict[str, Any]:
    """What exactly was evaluated: a sha256 over the files the model computes with.

    Files are hashed one by one (sha256 of the contents); the identity is the sha256 of the
    lines "<relative posix path>\\t<file sha256>\\n" sorted by path. Only what determines
    the model's outputs counts: weights, configs, tokenizer and processor files. Left out:

    * hidden files and hidden folders (any path part starting with "."): bookkeeping (the
      tiny checkpoint's completion marker, a .cache/ or .git/ beside the weights);
    * documentation and training records: *.md model cards, training_args.json,
      train_log.jsonl, split.json and eval_report.json. They describe how the weights were
      made and how they scored; editing the card (or re-recording the training run) does
      not change a single prediction, so it must not orphan an evaluation report of the
      same weights. Conversely, any change to a file that is hashed (config.json, the
      weights, the tokenizer) gives a new identity and needs a new report.

    A copy of the same model files gets the same identity. Symlinked files are hashed by
    their target's contents, so a Hugging Face cache snapshot (all symlinks into blobs/)
    and a plain copy agree; symlinked folders are not followed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    files: list[dict[str, Any]] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = Path(root) / name
            relative = path.relative_to(folder)
            if not is_model_file(relative):
                continue
            with path.open("rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            files.append(
                {
                    "path": relative.as_posix(),
                    "bytes": path.stat().st_size,
                    "sha256": digest,
                }
            )
    files.sort(key=lambda item: str(item["path"]))
    manifest = "".join(f"{item['path']}\t{item['sha256']}\n" for item in files)
    return {
        "sha256": hashlib.sha256(manifest.encode("utf-8")).hexdigest(),
        "files": files,
        "bytes": sum(int(item["bytes"]) for item in files),
        "method": f"sha256 of sorted '<path>\\t<sha256>\\n' lines; {IDENTITY_EXCLUDES}",
    }


# ---- report files ------------------------------------------------------------------------


def write_json(report: Mapping[str, Any], path: Path) -> Path:
    """report.json: strict JSON (no NaN), stable key order, written whole then renamed."""
    text = json.dumps(report, indent=2, allow_nan=False, default=str) + "\n"
    _write_text(path, text)
    return path


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> list[str]:
    """A Markdown table; `align` has one of 'l'/'r' per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    marks = [":--" if a == "l" else "--:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def confusion_text(labels: Sequence[str], matrix: Sequence[Sequence[int]]) -> list[str]:
    """The confusion matrix as a Markdown table, rows true, columns predicted, with totals."""
    header = ["true \\ predicted", *labels, "total"]
    rows: list[list[Any]] = []
    for label, row in zip(labels, matrix, strict=True):
        rows.append([f"**{label}**", *row, sum(row)])
    rows.append(["**total**", *(sum(col) for col in zip(*matrix, strict=True)), _total(matrix)])
    return _table(header, rows)


def _total(matrix: Sequence[Sequence[int]]) -> int:
    return sum(sum(row) for row in matrix)


def render_markdown(report: Mapping[str, Any]) -> str:
    """report.md: the same report as report.json, as tables for people."""
    model = report["model"]
    data = report["data"]
    m = report["metrics"]
    timing = report["timing"]
    labels: list[str] = m["labels"]
    calib = m["calibration"]
    lines = [f"# Evaluation of `{model['model_id']}`", ""]
    lines += [
        f"{data['images']} images from `{data['folder']}`"
        + (
            f" (split `{data['split']}` of `{data['split_file']}`)"
            if data.get("split_file")
            else ""
        )
        + f", evaluated {report['created_at']}.",
        "",
        "## Model",
        "",
        *_table(
            ["", ""],
            [
                ["path", f"`{model['path']}`"],
                ["model_id", f"`{model['model_id']}`"],
                ["identity (sha256)", f"`{model['identity']['sha256']}`"],
                [
                    "files",
                    f"{len(model['identity']['files'])} "
                    f"({model['identity']['bytes'] / 1e6:.1f} MB; model files only: "
                    "no dot-files, model card or training records)",
                ],
                ["device / dtype", f"{model['device']} / {model['dtype']}"],
                ["compiled", model["compiled"]],
                ["preprocess", model["settings"]["preprocess"]],
                ["batch size", model["batch_size"]],
            ],
            "ll",
        ),
        "",
        "## Summary",
        "",
        *_table(
            ["metric", "value"],
            [
                ["accuracy", _pct(m["accuracy"])],
                ["macro-F1", _num(m["macro_f1"])],
                [
                    "macro precision / recall",
                    f"{_num(m['macro_precision'])} / {_num(m['macro_recall'])}",
                ],
                ["top-2 accuracy", _pct(m["top2_accuracy"])],
                [f"ECE ({calib['bins']} bins)", _num(calib["ece"])],
                ["max calibration error", _num(calib["mce"])],
                ["NLL (mean)", _num(m["nll"])],
                ["Brier score", _num(m["brier"])],
                ["majority-class baseline accuracy", _pct(m["majority_baseline"])],
                ["chance (uniform) accuracy", _pct(1 / len(labels))],
            ],
        ),
        "",
        "## Throughput",
        "",
        *_table(
            ["", "value"],
            [
                ["engine images/s (classify only)", _num(timing["engine_images_per_s"], 1)],
                [
                    "end-to-end images/s (read + decode + classify)",
                    _num(timing["end_to_end_images_per_s"], 1),
                ],
                ["model load", f"{timing['load_s']:.2f} s"],
                ["warm-up", f"{timing['warm_up_s']:.2f} s"],
                ["checkpoint hashing", f"{timing['hash_s']:.2f} s"],
                ["evaluation loop", f"{timing['loop_s']:.2f} s"],
            ],
        ),
        "",
        "## Per class",
        "",
        *_table(
            ["label", "precision", "recall", "F1", "support", "predicted"],
            [
                [
                    label,
                    _num(row["precision"]),
                    _num(row["recall"]),
                    _num(row["f1"]),
                    row["support"],
                    row["predicted"],
                ]
                for label, row in m["per_class"].items()
            ],
        ),
        "",
        "## Confusion matrix",
        "",
        "Rows are the true label, columns the prediction.",
        "",
        *confusion_text(labels, m["confusion_matrix"]["counts"]),
        "",
        f"![confusion matrix]({report['files']['confusion_matrix']})",
        "",
        "## Calibration",
        "",
        f"Expected calibration error {_num(calib['ece'])} over {calib['bins']} equal-width bins "
        "of the confidence (the probability of the predicted label).",
        "",
        *_table(
            ["confidence", "count", "accuracy", "mean confidence", "gap"],
            [
                [
                    f"({b['lower']:.3f}, {b['upper']:.3f}]",
                    b["count"],
                    _num(b["accuracy"]),
                    _num(b["confidence"]),
                    _num(None if b["accuracy"] is None else abs(b["accuracy"] - b["confidence"])),
                ]
                for b in calib["per_bin"]
                if b["count"]
            ],
        ),
        "",
        f"![reliability diagram]({report['files']['reliability']})",
        "",
    ]
    skipped = data.get("skipped") or []
    if data.get("skipped_count"):
        lines += [
            "## Skipped images",
            "",
            f"{data['skipped_count']} image(s) could not be decoded and are not counted:",
            "",
            *[f"- `{item['path']}`: {item['error']}" for item in skipped],
            "",
        ]
    versions = report["versions"]
    lines += [
        "## Reproduce",
        "",
        "```",
        "emotion-worker eval " + " ".join(_quote(arg) for arg in report["command"]),
        "```",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
    ]
    return "\n".join(lines)


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


def write_markdown(report: Mapping[str, Any], path: Path) -> Path:
    """Write report.md (see render_markdown)."""
    _write_text(path, render_markdown(report))
    return path
