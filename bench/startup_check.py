"""Time to ready of the worker's engine: construction + warm_up(), as a worker starts it.

    python -m bench.startup_check --label cold --out FILE.json [--model tiny] [--batch N]

One process per measurement. bench/gpu_check.py runs it twice with TORCHINDUCTOR_CACHE_DIR
and TRITON_CACHE_DIR on the same, first empty, folder: the second run is a worker that
restarts with a warm compile cache. The engine gets the worker's default ModelSettings
(`compile` and `precision` "auto": on CUDA it compiles, and picks its quantization with a
start-up check) and max_batch_size=--batch, so warm_up() compiles every padding bucket up to
it, as `emotion-worker` does before it reports ready. The model is loaded (tiny) or built
with random weights (7B shape) first; that is reported apart, as `load_s`.

The JSON file is rewritten after every step, so a run cut by the caller's timeout still
says how far it got (`complete: false`, the warm-up calls done so far).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bench._bench_core import load_faces, process_age_s, sync, take
from bench._bench_options import device_of, load_model
from bench._frames import FER_FACES
from bench._llava_shapes import SHAPES
from consumer.config import ModelSettings
from consumer.engine import EmotionEngine


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.startup_check", description=(__doc__ or "").splitlines()[0]
    )
    add = parser.add_argument
    add("--label", default="startup", help="names the run in the JSON (cold, warm)")
    add("--out", type=Path, required=True, help="JSON file to write")
    add("--model", choices=["tiny", *SHAPES], help="default: llava-7b on CUDA, tiny on CPU")
    add("--model-path", type=Path, help="--model tiny: checkpoint folder")
    add("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add("--batch", type=int, default=1, help="the engine's max_batch_size (default 1)")
    add(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="model.compile (default auto, the worker's: compiled on CUDA only)",
    )
    add("--iterations", type=int, default=5, help="timed batches once ready")
    add("--data", type=Path, default=FER_FACES, help="faces for the timed batches")
    return parser.parse_args(argv)


class Report:
    """The JSON record of one run, written again after each step."""

    def __init__(self, path: Path, fields: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {**fields, "complete": False, "warmup_calls": []}
        self.write()

    def set(self, **fields: Any) -> None:
        self.data.update(fields)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=2, default=str), encoding="utf-8")
        temporary.replace(self.path)  # a reader (or a kill) never sees half a file


def _settings(args: argparse.Namespace, path: Path, device: torch.device) -> ModelSettings:
    """The worker's defaults for this checkpoint; only --compile may change one."""
    fields: dict[str, Any] = {"path": path, "device": device.type}
    if args.model in SHAPES:
        fields["dtype"] = "bfloat16"
    if args.compile != "auto":
        fields["compile"] = args.compile
    return ModelSettings(**fields)


def _warm_up(engine: EmotionEngine, device: torch.device, report: Report) -> None:
    """engine.warm_up(), noting each of its classify() calls (one per padding bucket)."""
    original = engine.classify

    def timed(faces: Any) -> Any:
        started = time.perf_counter()
        scores = original(faces)
        sync(device)
        report.data["warmup_calls"].append([len(faces), time.perf_counter() - started])
        report.write()
        return scores

    # warm_up() calls self.classify, which finds the instance attribute first.
    engine.classify = timed  # type: ignore[method-assign]
    try:
        engine.warm_up()
    finally:
        del engine.classify


def run(args: argparse.Namespace, scratch: Path) -> None:
    device = device_of(args.device)
    args.model = args.model or ("llava-7b" if device.type == "cuda" else "tiny")
    report = Report(
        args.out,
        {
            "label": args.label,
            "model": args.model,
            "device": str(device),
            "batch": args.batch,
            "compile_setting": args.compile,
            "compile_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
            "import_s": process_age_s(),  # interpreter start to here: the imports
        },
    )
    started = time.perf_counter()
    checkpoint, what = load_model(args.model, args.model_path, device, scratch)
    report.set(load_s=time.perf_counter() - started, what=what)
    settings = _settings(args, checkpoint.path, device)
    started = time.perf_counter()
    engine = EmotionEngine(checkpoint, settings, max_batch_size=args.batch)
    sync(device)
    construct_s = time.perf_counter() - started
    report.set(
        construct_s=construct_s,
        compiled=engine.compiled,
        buckets=list(engine.buckets or (args.batch,)),
        precision=getattr(engine, "precision", None),  # engines with model.precision
        precision_reason=getattr(engine, "precision_reason", None),
    )
    started = time.perf_counter()
    _warm_up(engine, device, report)
    warmup_s = time.perf_counter() - started
    report.set(warmup_s=warmup_s, ready_s=construct_s + warmup_s)
    faces, _, _ = load_faces(args.data, args.batch, scratch, 0)
    batch: list[Image.Image] = take(faces, args.batch)
    times = []
    for _ in range(args.iterations):
        started = time.perf_counter()
        engine.classify(batch)
        sync(device)
        times.append(time.perf_counter() - started)
    median = statistics.median(times) if times else float("nan")
    report.set(p50_ms=median * 1000, images_per_s=args.batch / median, complete=True)
    print(json.dumps(report.data), flush=True)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only; GPU hosts have no network
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="startup-check-"))
    try:
        run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
