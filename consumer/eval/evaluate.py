"""One run of `emotion-worker eval`: settings, engine, classification, metrics, report.

The engine is loaded with the worker's own ModelSettings (file < environment < flags, as
`emotion-worker run`: prompt, answer words, preprocessing, dtype, compilation), so the
numbers are those of the worker's model step, not of a separate path that could drift.
`eval --compare` (consumer.eval.compare) runs the same steps once per model setting.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consumer.config import ModelSettings, WorkerSettings, load_settings
from consumer.eval.classify import Predictions, classify_samples
from consumer.eval.dataset import EvalError, Sample, collect_samples, parse_class_map, read_split
from consumer.eval.identity import checkpoint_identity
from consumer.eval.metrics import ECE_BINS, compute_metrics
from consumer.eval.report import build_report, write_outputs


@dataclass(frozen=True, slots=True)
class ModelRun:
    """One model setting over the samples: its report (what report.json holds) and answers."""

    report: dict[str, Any]
    run: Predictions


def worker_settings(
    args: argparse.Namespace, overrides: Mapping[str, Any] | None = None
) -> WorkerSettings:
    """The worker's settings (file < environment < these flags < `overrides` of model.*)."""
    model: dict[str, Any] = {}
    if args.model is not None:
        model["path"] = args.model
    for flag in ("device", "dtype", "compile", "tta"):
        if getattr(args, flag) is not None:
            model[flag] = getattr(args, flag)
    if args.labels is not None:
        model["labels"] = tuple(part.strip() for part in args.labels.split(",") if part.strip())
    model.update(overrides or {})
    return load_settings(args.config, {"model": model} if model else None)


def check_args(args: argparse.Namespace, *, model_given: bool = False) -> None:
    """Refuse flags that cannot work together; `model_given`: the checkpoint comes otherwise
    (every side of --compare names its path=)."""
    if args.model is None and args.config is None and not model_given:
        raise EvalError("give the checkpoint with --model (or a --config with model.path)")
    for flag in ("limit", "per_class", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise EvalError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.split is not None and args.split_file is None:
        raise EvalError("--split needs --split-file")


def select_samples(args: argparse.Namespace, model_settings: ModelSettings) -> list[Sample]:
    """The labelled images the flags pick (--data, --split-file, --per-class, --limit, --seed)."""
    return collect_samples(
        args.data,
        model_settings.labels,
        class_map=parse_class_map(args.class_map),
        split_paths=read_split(args.split_file, args.split) if args.split_file else None,
        per_class=args.per_class,
        limit=args.limit,
        seed=args.seed,
    )


def evaluate(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run the evaluation the flags describe, write the report files, return the report."""
    check_args(args)
    settings = worker_settings(args)
    samples = select_samples(args, settings.model)
    args.out.mkdir(parents=True, exist_ok=True)
    return run_model(args, argv, settings, samples, args.out).report


def run_model(
    args: argparse.Namespace,
    argv: list[str],
    settings: WorkerSettings,
    samples: list[Sample],
    out: Path,
    *,
    identities: dict[Path, dict[str, Any]] | None = None,
    desc: str = "eval",
) -> ModelRun:
    """Load the engine, classify `samples`, write the report files into `out`, free the engine.

    `identities` caches checkpoint hashes by path: the two sides of a comparison of
    precisions share a checkpoint, and hashing 14 GB of a 7B model twice is a minute lost.
    """
    from consumer.engine import EmotionEngine  # torch: only once the inputs are known good

    model_settings = settings.model
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    engine = EmotionEngine.load(model_settings, max_batch_size=args.batch_size)
    loaded = time.perf_counter()
    engine.warm_up()
    warmed = time.perf_counter()
    # After the load: the loader has checked that the path is a complete checkpoint folder.
    key = model_settings.path.expanduser().resolve()
    cache = {} if identities is None else identities
    if key not in cache:
        cache[key] = checkpoint_identity(model_settings.path)
    identity = cache[key]
    hashed = time.perf_counter()

    run = classify_samples(engine, samples, args.batch_size, settings, quiet=args.quiet, desc=desc)
    metrics = compute_metrics(
        model_settings.labels, run.truth, run.predicted, run.scores, bins=ECE_BINS
    )
    report = build_report(
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
            "batches": len(run.batch_s),
            "median_batch_ms": 1000 * statistics.median(run.batch_s),
            "engine_images_per_s": _rate(len(run.truth), run.classify_s),
            "end_to_end_images_per_s": _rate(len(run.truth), run.loop_s),
        },
    )
    write_outputs(report, run, out, metrics.labels)
    device, compiled = engine.device, bool(engine.compiled)
    del engine  # the last reference: its weights can go before the next engine loads
    _free_device_memory(device, compiled)
    return ModelRun(report, run)


def _free_device_memory(device: Any, compiled: bool) -> None:
    """Give back what an engine held, so the next one (eval --compare's side B) has the GPU
    to itself: a 7B model in bfloat16 takes 14 GB, and two at once need not fit."""
    import torch

    if compiled:
        # Dynamo keys its compiled graphs on the scorer's code, not on the model: B's
        # buckets would pile onto A's and could reach its recompile limit, past which B
        # would silently run uncompiled. A clean slate compiles B as the worker would.
        torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0
