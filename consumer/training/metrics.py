"""Classification metrics for the validation split: accuracy, macro-F1, per class, confusion.

Macro-F1 is reported next to accuracy because FER-2013 is imbalanced: a model that never
answers "disgusted" loses 1.5% accuracy but a seventh of its macro-F1. The per-class
arithmetic is `emotion-worker eval`'s (consumer.eval.metrics); this only lays it out for the
per-epoch log.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from consumer.eval.metrics import per_class_metrics


def classification_report(
    truth: Sequence[int], predicted: Sequence[int], labels: Sequence[str]
) -> dict[str, Any]:
    """accuracy, macro_f1, per_class {label: precision, recall, f1, support}, confusion."""
    matrix = [[0] * len(labels) for _ in labels]  # rows: true label, columns: predicted
    for t, p in zip(truth, predicted, strict=True):
        matrix[t][p] += 1
    rows = per_class_metrics(labels, matrix)
    total = len(truth)
    correct = sum(matrix[i][i] for i in range(len(labels)))
    # A class absent from the split says nothing about the model.
    f1s = [row.f1 for row in rows if row.support]
    return {
        "images": total,
        "accuracy": round(correct / total, 4) if total else 0.0,
        "macro_f1": round(sum(f1s) / len(f1s), 4) if f1s else 0.0,
        "per_class": {
            row.label: {
                "precision": round(row.precision, 4),
                "recall": round(row.recall, 4),
                "f1": round(row.f1, 4),
                "support": row.support,
            }
            for row in rows
        },
        "confusion": {"labels": list(labels), "rows_true_columns_predicted": matrix},
    }
