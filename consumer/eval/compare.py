"""`emotion-worker eval --compare A B`: two model settings over the same faces.

Each side is a comma-separated list of KEY=VALUE overrides of the model settings
(`model.*` of the config: `dtype=bfloat16`, `compile=off,preprocess=processor`,
`path=models/other` for another checkpoint; "" for the settings as configured). The keys
are not listed here: whatever fields ModelSettings has can be compared, and a side is
validated by ModelSettings itself (through load_settings, as every other setting), so a
typo fails with the same one-line message, before any model loads.

The sides run one after the other, each through consumer.eval.evaluate.run_model (the
normal eval: its report lands in a/ and b/), and each engine is freed before the next
loads, so a pair of 7B models needs the GPU memory of one. consumer.eval.agreement
computes the differences; compare.json and compare.md hold them.
"""

from __future__ import annotations

import argparse
import difflib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from consumer.config import ConfigError, ModelSettings, WorkerSettings
from consumer.eval.agreement import compare_predictions
from consumer.eval.evaluate import ModelRun, check_args, run_model, select_samples, worker_settings
from consumer.eval.markdown import render_compare_markdown
from consumer.eval.report import REPORT_FILES, write_json, write_text

SIDES = ("A", "B")
COMPARE_FILES = {"json": "compare.json", "markdown": "compare.md"}
# What the comparison repeats of each side's report (the rest is in a/ and b/report.json).
_DATA_KEYS = (
    "folder",
    "split_file",
    "split",
    "class_map",
    "seed",
    "limit",
    "per_class",
    "selected",
    "images",
    "skipped_count",
)


@dataclass(frozen=True, slots=True)
class Side:
    """One side of --compare: its name (A, B), the text given, and the settings it sets."""

    name: str
    spec: str
    overrides: dict[str, Any]

    @property
    def folder(self) -> str:
        """The sub-folder of --out that holds this side's normal eval report."""
        return self.name.lower()

    @property
    def where(self) -> str:
        """How error messages name this side."""
        return _where(self.name, self.spec)


def _where(name: str, spec: str) -> str:
    return f"--compare {name} {spec!r}"


def split_items(spec: str) -> list[str]:
    """The KEY=VALUE items of a side: split at commas outside JSON strings and lists, so
    `prompt="..., ..."` and `answer_words=["a","b"]` stay whole."""
    items: list[str] = []
    current: list[str] = []
    depth, quoted, escaped = 0, False, False
    for char in spec:
        if quoted:
            escaped, quoted = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            quoted = True
        elif char in "[]":
            depth += 1 if char == "[" else -1
        elif char == "," and depth == 0:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def parse_side(name: str, spec: str) -> Side:
    """A side's overrides, each key a ModelSettings field; ConfigError names what is wrong."""
    where = _where(name, spec)
    fields = list(ModelSettings.model_fields)
    overrides: dict[str, Any] = {}
    for item in split_items(spec):
        raw_key, sep, raw_value = item.partition("=")
        key = raw_key.strip().removeprefix("model.")
        if not sep or not key:
            raise ConfigError(
                f"{where}: {item!r} is not KEY=VALUE; a side is a comma-separated list of "
                'model settings, e.g. "dtype=bfloat16,compile=off" (or "" for the settings '
                "as configured)"
            )
        if key not in fields:
            raise ConfigError(f"{where}: {_unknown_key(key, raw_value.strip(), fields)}")
        if key in overrides:
            raise ConfigError(f"{where}: model.{key} is given twice")
        overrides[key] = _value(raw_value.strip(), f"{where}: model.{key}")
    return Side(name, spec, overrides)


def _unknown_key(key: str, value: str, fields: list[str]) -> str:
    """Why `key` is refused, and what to write instead."""
    try:
        ModelSettings.model_validate({key: value})
    except ValidationError as exc:
        # The settings model may know the key (a removed or renamed setting) and name what
        # replaced it; that says more than a list of the fields.
        own = [err["msg"] for err in exc.errors() if err["type"] != "extra_forbidden"]
        if own:
            return str(own[0])
    close = difflib.get_close_matches(key, fields, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return (
        f"{key!r} is not a model setting; {hint}the model settings are {', '.join(fields)} "
        "(see docs/configuration.md#model)"
    )


def _value(text: str, where: str) -> Any:
    """A value as given; JSON when it is a list or a quoted string (the settings model
    converts the rest: "true" to a bool, a path to a Path, and refuses what does not fit)."""
    if not text.startswith(("[", '"')):
        return text
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{where}: {text!r} is not valid JSON ({exc})") from None


def side_settings(args: argparse.Namespace, side: Side) -> WorkerSettings:
    """The worker's settings with the side's overrides on top (file < env < flags < side)."""
    try:
        return worker_settings(args, side.overrides)
    except ConfigError as exc:
        raise ConfigError(f"{side.where}: {exc}") from exc


def compare(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run both sides over the same faces, write compare.json/.md, return the comparison."""
    sides = [parse_side(name, spec) for name, spec in zip(SIDES, args.compare, strict=True)]
    check_args(args, model_given=all("path" in side.overrides for side in sides))
    worker_settings(args)  # a mistake in the file or the flags is named as such, not as a side's
    # Every side is validated before the first model loads: a typo in B must not cost A's run.
    settings = [side_settings(args, side) for side in sides]
    labels = settings[0].model.labels
    if settings[1].model.labels != labels:
        raise ConfigError(
            f"--compare: the sides have different model.labels ({list(labels)} and "
            f"{list(settings[1].model.labels)}); faces are matched label by label, so give "
            "both the same labels"
        )
    samples = select_samples(args, settings[0].model)
    args.out.mkdir(parents=True, exist_ok=True)
    identities: dict[Path, dict[str, Any]] = {}
    runs: list[ModelRun] = []
    for side, side_setting in zip(sides, settings, strict=True):
        try:
            runs.append(
                run_model(
                    args,
                    argv,
                    side_setting,
                    samples,
                    args.out / side.folder,
                    identities=identities,
                    desc=side.name,
                )
            )
        except ConfigError as exc:  # the engine's ModelLoadError: e.g. fp8 without a GPU
            raise ConfigError(f"{side.where}: {exc}") from exc
    comparison = build_comparison(argv, sides, settings, runs)
    write_text(args.out / COMPARE_FILES["markdown"], render_compare_markdown(comparison))
    write_json(comparison, args.out / COMPARE_FILES["json"])  # last: a whole comparison
    return comparison


def build_comparison(
    argv: list[str],
    sides: list[Side],
    settings: list[WorkerSettings],
    runs: list[ModelRun],
) -> dict[str, Any]:
    """compare.json: each side's setup, accuracy and speed, and how their answers differ."""
    a, b = (s.model.model_dump(mode="json") for s in settings)
    first = runs[0].report
    return {
        "schema": "emotion-worker/eval-compare/1",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": argv,
        "data": {key: first["data"][key] for key in _DATA_KEYS},
        "differs": {key: {"A": a[key], "B": b.get(key)} for key in a if a[key] != b.get(key)},
        "sides": {
            side.name: _side_summary(side, run.report)
            for side, run in zip(sides, runs, strict=True)
        },
        **compare_predictions(first["metrics"]["labels"], runs[0].run, runs[1].run),
        "files": {
            **COMPARE_FILES,
            **{side.name: f"{side.folder}/{REPORT_FILES['markdown']}" for side in sides},
        },
    }


def _side_summary(side: Side, report: dict[str, Any]) -> dict[str, Any]:
    model, metrics, timing = report["model"], report["metrics"], report["timing"]
    return {
        "spec": side.spec,
        "overrides": side.overrides,
        "report": f"{side.folder}/{REPORT_FILES['json']}",
        "model": {
            "path": model["path"],
            "model_id": model["model_id"],
            "sha256": model["identity"]["sha256"],
            "device": model["device"],
            "dtype": model["dtype"],
            "compiled": model["compiled"],
            "batch_size": model["batch_size"],
        },
        "metrics": {
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "ece": metrics["calibration"]["ece"],
            "nll": metrics["nll"],
        },
        "speed": {
            key: timing[key]
            for key in (
                "engine_images_per_s",
                "end_to_end_images_per_s",
                "median_batch_ms",
                "batches",
                "load_s",
                "warm_up_s",
            )
        },
    }
