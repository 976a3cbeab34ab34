"""One run of `emotion-worker eval`: settings, engine, classification, metrics, report.

The engine is loaded with the worker's own ModelSettings (file < environment < flags, as
`emotion-worker run`: prompt, answer words, preprocessing, dtype, compilation), so the
numbers are those of the worker's model step, not of a separate path that could drift.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from consumer.config import WorkerSettings, load_settings
from consumer.eval.classify import classify_samples
from consumer.eval.dataset import EvalError, collect_samples, parse_class_map, read_split
from consumer.eval.identity import checkpoint_identity
from consumer.eval.metrics import ECE_BINS, compute_metrics
from consumer.eval.report import build_report, write_outputs


def _settings(args: argparse.Namespace) -> WorkerSettings:
    """The worker's settings (file < environment < these flags), as `emotion-worker run`."""
    model: dict[str, Any] = {}
    if args.model is not None:
        model["path"] = args.model
    for flag in ("device", "dtype", "compile"):
        if getattr(args, flag) is not None:
            model[flag] = getattr(args, flag)
    if args.labels is not None:
        model["labels"] = tuple(part.strip() for part in args.labels.split(",") if part.strip())
    return load_settings(args.config, {"model": model} if model else None)


def _check_args(args: argparse.Namespace) -> None:
    if args.model is None and args.config is None:
        raise EvalError("give the checkpoint with --model (or a --config with model.path)")
    for flag in ("limit", "per_class", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise EvalError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.split is not None and args.split_file is None:
        raise EvalError("--split needs --split-file")


def evaluate(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Run the evaluation the flags describe, write the report files, return the report."""
    _check_args(args)
    settings = _settings(args)
    model_settings = settings.model
    class_map = parse_class_map(args.class_map)
    split_paths = read_split(args.split_file, args.split) if args.split_file else None
    samples = collect_samples(
        args.data,
        model_settings.labels,
        class_map=class_map,
        split_paths=split_paths,
        per_class=args.per_class,
        limit=args.limit,
        seed=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)

    from consumer.engine import EmotionEngine  # torch: only once the inputs are known good

    started = time.perf_counter()
    engine = EmotionEngine.load(model_settings, max_batch_size=args.batch_size)
    loaded = time.perf_counter()
    engine.warm_up()
    warmed = time.perf_counter()
    # After the load: the loader has checked that the path is a complete checkpoint folder.
    identity = checkpoint_identity(model_settings.path)
    hashed = time.perf_counter()

    run = classify_samples(engine, samples, args.batch_size, settings, quiet=args.quiet)
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
            "engine_images_per_s": _rate(len(run.truth), run.classify_s),
            "end_to_end_images_per_s": _rate(len(run.truth), run.loop_s),
        },
    )
    write_outputs(report, run, args.out, metrics.labels)
    return report


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0
