"""report.md: the report of `emotion-worker eval` as Markdown tables for people.

Rendering only: a pure function of the report dict (what report.json holds), so the
document can be checked without a model and re-rendered from a saved report.json.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


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


def confusion_text(
    labels: Sequence[str], matrix: Sequence[Sequence[int]], corner: str = "true \\ predicted"
) -> list[str]:
    """The confusion matrix as a Markdown table, rows true, columns predicted, with totals."""
    header = [corner, *labels, "total"]
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
                ["test-time augmentation", model["settings"].get("tta", "none")],
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
                *(
                    [["median ms per batch (engine)", _num(timing["median_batch_ms"], 1)]]
                    if "median_batch_ms" in timing  # absent from older report.json files
                    else []
                ),
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


# Disagreeing faces shown in compare.md; compare.json lists more (agreement.py).
_DISAGREEMENTS_SHOWN = 20


def render_compare_markdown(comparison: Mapping[str, Any]) -> str:
    """compare.md: the comparison of `eval --compare` (what compare.json holds) for people."""
    sides = comparison["sides"]
    a, b = sides["A"], sides["B"]
    agreement, scores, truth = comparison["agreement"], comparison["scores"], comparison["truth"]
    labels: list[str] = agreement["matrix"]["labels"]
    data = comparison["data"]
    differs = ", ".join(f"`{key}`" for key in comparison["differs"]) or "nothing"
    faces = comparison["faces"]

    def side_row(name: str, get: Any) -> list[Any]:
        return [name, get(a), get(b)]

    speed_up = _ratio_text(b["speed"]["engine_images_per_s"], a["speed"]["engine_images_per_s"])
    lines = [
        f"# Comparison: A `{a['spec']}` against B `{b['spec']}`",
        "",
        f"The same {faces} faces from `{data['folder']}` through both settings (A first, "
        f"then B, one model in memory at a time), compared {comparison['created_at']}. "
        f"Settings that differ: {differs}.",
        "",
        "## Summary",
        "",
        *_table(
            ["", "A", "B"],
            [
                side_row("setting", lambda s: f"`{s['spec']}`" if s["spec"] else "(as configured)"),
                side_row("checkpoint", lambda s: f"`{s['model']['path']}`"),
                side_row("identity (sha256)", lambda s: f"`{s['model']['sha256'][:16]}`"),
                side_row(
                    "device / dtype", lambda s: f"{s['model']['device']} / {s['model']['dtype']}"
                ),
                side_row("compiled", lambda s: s["model"]["compiled"]),
                side_row("accuracy", lambda s: _pct(s["metrics"]["accuracy"])),
                side_row("macro-F1", lambda s: _num(s["metrics"]["macro_f1"])),
                side_row("ECE", lambda s: _num(s["metrics"]["ece"])),
                side_row("engine images/s", lambda s: _num(s["speed"]["engine_images_per_s"], 1)),
                side_row("median ms per batch", lambda s: _num(s["speed"]["median_batch_ms"], 1)),
                side_row("warm-up", lambda s: f"{s['speed']['warm_up_s']:.2f} s"),
                side_row("model load", lambda s: f"{s['speed']['load_s']:.2f} s"),
                [
                    "full report",
                    *(f"[{comparison['files'][n]}]({comparison['files'][n]})" for n in ("A", "B")),
                ],
            ],
            "lll",
        ),
        "",
        f"B's engine throughput is {speed_up} A's (batch size {a['model']['batch_size']}). "
        "B runs second: caches A warmed (files, compiled kernels) can shorten B's load and "
        "warm-up, not its per-batch time.",
        "",
        "## Agreement",
        "",
        *_table(
            ["", "value"],
            [
                ["same label", f"{_pct(agreement['rate'])} ({agreement['agree']} of {faces})"],
                [
                    "largest score difference",
                    f"{_num(scores['max_abs_diff'])} (`{scores['max_abs_diff_face']}`)",
                ],
                ["mean score difference", _num(scores["mean_abs_diff"], 6)],
                [
                    "largest difference per face: median / 95th percentile",
                    f"{_num(scores['face_max_abs_diff_p50'])} / "
                    f"{_num(scores['face_max_abs_diff_p95'])}",
                ],
                [
                    "right only with A / only with B",
                    f"{truth['only_a_correct']} / {truth['only_b_correct']} "
                    f"(McNemar exact p = {_num(truth['mcnemar_p'])})",
                ],
            ],
        ),
        "",
        "A score difference is |p_A(label) - p_B(label)|, over every face and label. A small "
        "p says the accuracies really differ; a large one that the faces only one side gets "
        "right could be chance.",
        "",
        "## Per label",
        "",
        *_table(
            ["label", "A predicts", "B predicts", "both", "B agrees with A", "mean abs diff"],
            [
                [
                    label,
                    row["a_predicted"],
                    row["b_predicted"],
                    row["both"],
                    _pct(row["agreement"]),
                    _num(row["mean_abs_diff"], 6),
                ]
                for label, row in agreement["per_label"].items()
            ],
        ),
        "",
        "## A against B",
        "",
        "Rows are A's label, columns B's; the diagonal is where they agree.",
        "",
        *confusion_text(labels, agreement["matrix"]["counts"], corner="A \\ B"),
        "",
    ]
    shown = comparison["disagreements"][:_DISAGREEMENTS_SHOWN]
    if shown:
        lines += [
            "## Faces they disagree on",
            "",
            (
                f"{len(shown)} faces, the most different first:"
                if comparison["disagreements_count"] == len(shown)
                else f"{comparison['disagreements_count']} in all; the {len(shown)} with the "
                "largest score difference (compare.json lists more):"
            ),
            "",
            *_table(
                ["face", "true", "A", "B", "A confidence", "B confidence", "largest abs diff"],
                [
                    [
                        f"`{row['path']}`",
                        row["true"],
                        row["a"],
                        row["b"],
                        _num(row["a_confidence"]),
                        _num(row["b_confidence"]),
                        _num(row["max_abs_diff"]),
                    ]
                    for row in shown
                ],
                "llllrrr",
            ),
            "",
        ]
    lines += [
        "## Reproduce",
        "",
        "```",
        "emotion-worker eval " + " ".join(_quote(arg) for arg in comparison["command"]),
        "```",
        "",
    ]
    return "\n".join(lines)


def _ratio_text(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if reference > 0 else "- of"
