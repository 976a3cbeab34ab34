"""The numbers of `emotion-worker eval`: confusion matrix, per-class P/R/F1, calibration.

Everything here is a pure function of (true labels, predicted labels, score vectors), so
the metrics can be checked on hand-made inputs without a model, and the metrics of a run
can be recomputed from its predictions.jsonl.

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

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
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
