"""Classification metrics for the validation split: accuracy, macro-F1, per class, confusion.

Macro-F1 is reported next to accuracy because FER-2013 is imbalanced: a model that never
answers "disgusted" loses 1.5% accuracy but a seventh of its macro-F1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def confusion_matrix(
    truth: Sequence[int], predicted: Sequence[int], classes: int
) -> list[list[int]]:
    """rows: true label, columns: predicted label."""
    matrix = [[0] * classes for _ in range(classes)]
    for t, p in zip(truth, predicted, strict=True):
        matrix[t][p] += 1
    return matrix


def classification_report(
    truth: Sequence[int], predicted: Sequence[int], labels: Sequence[str]
) -> dict[str, Any]:
    """accuracy, macro_f1, per_class {label: precision, recall, f1, support}, confusion."""
    classes = len(labels)
    matrix = confusion_matrix(truth, predicted, classes)
    total = len(truth)
    correct = sum(matrix[i][i] for i in range(classes))
    per_class: dict[str, dict[str, float | int]] = {}
    f1s: list[float] = []
    for i, label in enumerate(labels):
        support = sum(matrix[i])
        predicted_i = sum(row[i] for row in matrix)
        precision = matrix[i][i] / predicted_i if predicted_i else 0.0
        recall = matrix[i][i] / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": support,
        }
        if support:  # a class absent from the split says nothing about the model
            f1s.append(f1)
    return {
        "images": total,
        "accuracy": round(correct / total, 4) if total else 0.0,
        "macro_f1": round(sum(f1s) / len(f1s), 4) if f1s else 0.0,
        "per_class": per_class,
        "confusion": {"labels": list(labels), "rows_true_columns_predicted": matrix},
    }
