"""The numbers of `emotion-worker eval --compare`: how far two model settings' answers differ.

Pure functions of two runs' predictions over the same faces (no model), so they can be
checked on hand-made inputs and recomputed from the two predictions.jsonl files:

* label agreement: the share of faces whose top label is the same under both settings,
  and the A-by-B table of labels (the diagonal agrees);
* score differences: |p_A(label) - p_B(label)| over every face and label (max, mean), and
  the largest difference of each face (its 95th percentile says how often a face moves);
* against the true labels: the faces only one side gets right, and McNemar's exact test
  of whether that split could be chance (the accuracy difference of a precision change is
  often a handful of faces, which says nothing on its own).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from consumer.eval.classify import Predictions
from consumer.eval.metrics import EvalInputError, confusion_matrix

# Faces listed by name in compare.json (and the first of them in compare.md), most
# different first; every face's answers stay in each side's predictions.jsonl.
DISAGREEMENTS_LISTED = 100


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the chance of a split at least this uneven of the
    faces exactly one side gets right, if both sides were equally accurate."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    # Integer arithmetic until the one division: 2**n overflows a float from n = 1024.
    return min(1.0, 2 * tail / (1 << n))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between order statistics (numpy's default)."""
    if not values:
        raise EvalInputError("no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def compare_predictions(labels: Sequence[str], a: Predictions, b: Predictions) -> dict[str, Any]:
    """Agreement, score differences and accuracy split of two runs, as compare.json holds.

    Faces are matched by path; a face only one side could classify (possible only if a
    file changed between the runs) is counted in `unmatched` and left out of the rest.
    """
    b_index = {path: i for i, path in enumerate(b.relative)}
    pairs = [(i, b_index[path]) for i, path in enumerate(a.relative) if path in b_index]
    if not pairs:
        raise EvalInputError("the two runs have no face in common")
    paths = [a.relative[i] for i, _ in pairs]
    truth = [a.truth[i] for i, _ in pairs]
    a_pred = [a.predicted[i] for i, _ in pairs]
    b_pred = [b.predicted[j] for _, j in pairs]
    n = len(pairs)
    face_diffs: list[list[float]] = [
        [abs(p - q) for p, q in zip(a.scores[i], b.scores[j], strict=True)] for i, j in pairs
    ]
    face_max = [max(diffs) for diffs in face_diffs]
    worst = max(range(n), key=face_max.__getitem__)
    matrix = confusion_matrix(labels, a_pred, b_pred)  # rows A's label, columns B's
    agree = sum(matrix[k][k] for k in range(len(labels)))
    a_right = [t == p for t, p in zip(truth, a_pred, strict=True)]
    b_right = [t == p for t, p in zip(truth, b_pred, strict=True)]
    only_a = sum(x and not y for x, y in zip(a_right, b_right, strict=True))
    only_b = sum(y and not x for x, y in zip(a_right, b_right, strict=True))
    per_label: dict[str, dict[str, Any]] = {}
    for k, label in enumerate(labels):
        a_count = sum(matrix[k])
        per_label[label] = {
            "a_predicted": a_count,
            "b_predicted": sum(row[k] for row in matrix),
            "both": matrix[k][k],
            # Of the faces A calls this label, the share B calls it too.
            "agreement": matrix[k][k] / a_count if a_count else None,
            "mean_abs_diff": sum(diffs[k] for diffs in face_diffs) / n,
        }
    disagreements = sorted(
        (m for m in range(n) if a_pred[m] != b_pred[m]), key=lambda m: -face_max[m]
    )
    return {
        "faces": n,
        "unmatched": len(a.relative) + len(b.relative) - 2 * n,
        "agreement": {
            "agree": agree,
            "rate": agree / n,
            "per_label": per_label,
            "matrix": {
                "rows": "A's label",
                "columns": "B's label",
                "labels": list(labels),
                "counts": matrix,
            },
        },
        "scores": {
            "max_abs_diff": face_max[worst],
            "max_abs_diff_face": paths[worst],
            "mean_abs_diff": sum(map(sum, face_diffs)) / (n * len(labels)),
            "face_max_abs_diff_p50": percentile(face_max, 50),
            "face_max_abs_diff_p95": percentile(face_max, 95),
        },
        "truth": {
            "a_correct": sum(a_right),
            "b_correct": sum(b_right),
            "a_accuracy": sum(a_right) / n,
            "b_accuracy": sum(b_right) / n,
            "only_a_correct": only_a,
            "only_b_correct": only_b,
            "mcnemar_p": mcnemar_p(only_a, only_b),
        },
        "disagreements_count": len(disagreements),
        "disagreements": [
            {
                "path": paths[m],
                "true": truth[m],
                "a": a_pred[m],
                "b": b_pred[m],
                "a_confidence": max(a.scores[pairs[m][0]]),
                "b_confidence": max(b.scores[pairs[m][1]]),
                "max_abs_diff": face_max[m],
            }
            for m in disagreements[:DISAGREEMENTS_LISTED]
        ],
    }
