"""Benchmark the LLaVA emotion engine's variants and the whole worker: one markdown table.

Per engine variant and batch size: throughput, latency, FLOP/s, memory and label agreement;
plus the whole Kafka worker end to end.

    python -m bench.llava_bench                    # CPU: tiny model; CUDA: LLaVA-1.5-7B shape
    python -m bench.llava_bench --model llava-7b   # random 7B-shaped weights, built on the GPU

Every row runs in its own try/except and the whole run keeps to --time-budget-s (a watchdog
writes the table and exits when it is reached), so a single shot on a GPU always yields a
table. See bench/README.md for the columns.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench._bench_core import (
    CLEANUPS,
    Bench,
    Budget,
    ModuleTree,
    Row,
    load_faces,
    model_fingerprint,
    peak_gib,
    process_age_s,
    release,
    reset_peak,
    run_cleanups,
    sync,
    variant_settings,
)
from bench._bench_report import Finisher
from bench._bench_rows import engine_row, naive_row
from bench._bench_worker import broker_unavailable, worker_row
from bench._frames import FER_FACES
from bench._llava_shapes import (
    SHAPES,
    build_random_checkpoint,
    count_params,
    meta_param_count,
    params_text,
    prompt_flops,
    write_shape_folder,
)
from consumer.config import ModelSettings
from consumer.engine import EmotionEngine, make_tiny_checkpoint
from consumer.engine.loader import load_checkpoint
from consumer.engine.scoring import label_token_ids

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = FER_FACES
VARIANTS = ("naive-generate", "eager", "processor-preprocess", "compiled", "fp8")
# (CUDA, CPU) defaults of the options whose sensible value depends on the device.
DEVICE_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "model": ("llava-7b", "tiny"),
    "batch_sizes": ("1,8,32", "1,16"),
    "iterations": (20, 10),
    "worker_events": (512, 200),
    "row_time_s": (10.0, 5.0),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Options; the device-dependent ones stay None until `_apply_defaults`."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.llava_bench", description=(__doc__ or "").splitlines()[0]
    )
    add = parser.add_argument
    add(
        "--model",
        choices=["tiny", *SHAPES],
        help="default: llava-7b on CUDA, tiny on CPU "
        "(llava-7b-mini: the 7B image geometry with tiny widths, to test the path on a CPU)",
    )
    add(
        "--model-path",
        type=Path,
        help="--model tiny: checkpoint folder to load; a tiny one is "
        "written there if it has no config.json (default .cache/models/tiny-llava)",
    )
    add("--device", choices=["auto", "cpu", "cuda"], default="auto")
    add("--batch-sizes", help='comma list; default "1,8,32" on CUDA, "1,16" on CPU')
    add("--variants", help=f"comma list of {','.join(VARIANTS)}; default all that apply")
    add("--iterations", type=int, help="timed batches per row (median); default 20 CUDA, 10 CPU")
    add("--row-time-s", type=float, help="stop a row's timing loop after this many seconds")
    add("--time-budget-s", type=float, default=270.0, help="whole run, from process start")
    add("--data", type=Path, default=DEFAULT_DATA, help="face folder, one subfolder per class")
    add("--agree-faces", type=int, default=32, help="faces for the label agreement columns")
    add("--flops-per-image", type=float, help="override the computed FLOP estimate")
    add("--peak-tflops", type=float, default=790.0, help="bf16 dense ceiling (H200: 790)")
    add("--worker-events", type=int, help="events for the worker row; default 512 CUDA, 200 CPU")
    add("--bootstrap-servers", help="use this Kafka broker instead of starting a local one")
    add("--no-worker", action="store_true", help="skip the end-to-end worker row")
    add("--out", type=Path, default=REPO / ".cache" / "bench", help="folder for .md and .json")
    return parser.parse_args(argv)


def _apply_defaults(args: argparse.Namespace, device: torch.device) -> None:
    for name, (cuda, cpu) in DEVICE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, cuda if device.type == "cuda" else cpu)
    args.batch_list = sorted({int(size) for size in args.batch_sizes.split(",") if size.strip()})
    unknown = set(args.variants.split(",")) - set(VARIANTS) if args.variants else set()
    if unknown:
        raise SystemExit(f"unknown --variants {sorted(unknown)}; choose from {VARIANTS}")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _skip_reason(variant: str, args: argparse.Namespace, device: torch.device) -> str | None:
    """Why `variant` does not run here (None: it runs)."""
    asked = args.variants.split(",") if args.variants else None
    if asked is not None and variant not in asked:
        return "not in --variants"
    if variant == "compiled" and device.type != "cuda" and asked is None:
        return "CUDA only by default (compiling on a CPU takes minutes); --variants forces it"
    if variant == "fp8":
        if device.type != "cuda":
            return "needs a CUDA GPU of compute capability 8.9+"
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            return f"compute capability {capability} < (8, 9): no FP8 matmuls"
    return None


def _load_model(args: argparse.Namespace, device: torch.device, scratch: Path) -> tuple[Any, str]:
    """The LoadedCheckpoint of --model, and a line saying what it is."""
    if args.model == "tiny":
        path = args.model_path or REPO / ".cache" / "models" / "tiny-llava"
        if not (path / "config.json").exists():
            make_tiny_checkpoint(path)
        settings = variant_settings({"path": path, "device": device.type}, "eager")[0]
        # What EmotionEngine.load does, split so the checkpoint can serve every variant.
        return load_checkpoint(settings), f"checkpoint {path}"
    folder = write_shape_folder(scratch / f"{args.model}-shape", SHAPES[args.model])
    checkpoint = build_random_checkpoint(folder, device, torch.bfloat16)
    return checkpoint, f"{args.model}-shaped model, RANDOM weights built on {device}"


def _setup(args: argparse.Namespace, device: torch.device, budget: Budget, scratch: Path) -> Bench:
    """Faces, model and prompt; then the startup row (which may fail without ending the run)."""
    wanted = max(max(args.batch_list), args.agree_faces)
    files = 0 if args.no_worker else args.worker_events
    faces, folder, face_note = load_faces(args.data, wanted, scratch, files)
    print(f"faces: {face_note}", flush=True)
    reset_peak(device)
    started = time.perf_counter()
    checkpoint, what = _load_model(args, device, scratch)
    load_s = time.perf_counter() - started
    print(f"model ready in {load_s:.1f}s: {what}", flush=True)
    dtype = "bfloat16" if args.model in SHAPES else "auto"
    base = {"path": checkpoint.path, "device": device.type, "dtype": dtype}
    settings = variant_settings(base, "eager")[0]
    prompt_text = settings.prompt.format(labels=", ".join(settings.words))
    bench = Bench(
        device=device,
        checkpoint=checkpoint,
        base_settings=base,
        faces=faces,
        agree_faces=faces[: args.agree_faces],
        face_folder=folder,
        flops_per_image=0.0,
        peak_tflops=args.peak_tflops if device.type == "cuda" else None,
        iterations=args.iterations,
        budget=budget,
        pristine=ModuleTree(checkpoint.model),  # before any engine edits the model
        labels=settings.labels,
        label_token_ids=tuple(
            label_token_ids(
                checkpoint.processor.tokenizer, prompt_text, settings.labels, settings.words
            )
        ),
        prompt_text=prompt_text,
    )
    _describe(bench, args, what, face_note)
    bench.add(_startup_row(bench, settings, max(args.batch_list), load_s))
    return bench


def _startup_row(bench: Bench, settings: ModelSettings, batch: int, load_s: float) -> Row:
    """engine.warm_up() of the eager engine, and the reference scores every row is held to."""
    row = Row("startup", batch, load_s=load_s)
    try:
        engine = EmotionEngine(bench.checkpoint, settings, max_batch_size=batch)
        started = time.perf_counter()
        engine.warm_up()
        sync(bench.device)
        row.warmup_s = time.perf_counter() - started
        bench.reference = engine.classify(bench.agree_faces)
        row.note = "load/build, then eager engine.warm_up() at the largest batch"
    except Exception as exc:  # the other rows (naive-generate at least) can still run
        traceback.print_exc()
        row.note = f"eager engine failed, no agreement reference: {type(exc).__name__}: {exc}"
    row.peak_gib = peak_gib(bench.device)
    return row


def _describe(bench: Bench, args: argparse.Namespace, what: str, face_note: str) -> None:
    """Work out FLOPs per image and write the notes above the table."""
    checkpoint = bench.checkpoint
    sequence, image_tokens, estimate = prompt_flops(checkpoint, bench.prompt_text)
    bench.flops_per_image = args.flops_per_image or estimate
    source = "from --flops-per-image" if args.flops_per_image else "estimated"
    bench.notes += [
        f"model: {what}; {params_text(count_params(checkpoint.model))} params; {checkpoint.dtype}",
        f"sequence {sequence} tokens ({image_tokens} image tokens); "
        f"{bench.flops_per_image / 1e12:.4g} TFLOP per image ({source}; "
        f"estimate {estimate / 1e12:.4g})",
        f"faces: {face_note}",
        f"agreement: vs the eager engine at batch {max(args.batch_list)} on "
        f"{len(bench.agree_faces)} faces",
    ]
    if args.model == "llava-7b-mini":
        full = meta_param_count(SHAPES["llava-7b"])
        bench.notes.append(f"the full llava-7b shape has {params_text(full)} params")


def _plan(
    bench: Bench, args: argparse.Namespace
) -> list[tuple[str, int | None, Callable[[], Row]]]:
    """(variant, batch, run) in execution order, cheap and important first.

    Larger batches run first within a variant: they give the headline throughput, and the
    budget cuts the rows at the end. compiled is last: each of its rows compiles a 7B
    graph (tens of seconds), so it is what the budget should cut.
    """
    plan: list[tuple[str, int | None, Callable[[], Row]]] = []
    sizes = sorted(args.batch_list, reverse=True)

    def engine_rows(variant: str) -> None:
        for size in sizes:
            plan.append((variant, size, functools.partial(engine_row, bench, variant, size)))

    engine_rows("eager")
    engine_rows("processor-preprocess")
    plan.append(("naive-generate", 1, lambda: naive_row(bench)))
    plan.append(
        (
            "worker",
            None,
            lambda: worker_row(
                bench, _best_eager_batch(bench, args), args.worker_events, args.bootstrap_servers
            ),
        )
    )
    engine_rows("fp8")
    engine_rows("compiled")
    return plan


def _best_eager_batch(bench: Bench, args: argparse.Namespace) -> int:
    """The batch size of the fastest eager row (the largest if none was measured)."""
    largest: int = max(args.batch_list)
    eager = [r for r in bench.rows if r.variant == "eager" and r.images_per_s]
    if not eager:
        return largest
    return max(eager, key=lambda r: r.images_per_s or 0.0).batch or largest


def _worker_skip(args: argparse.Namespace) -> str | None:
    if args.no_worker:
        return "--no-worker"
    try:
        return broker_unavailable(args.bootstrap_servers)
    except Exception as exc:  # deploy/ missing or broken: the engine rows still count
        return f"cannot check for a broker: {exc}"


def _run_rows(bench: Bench, args: argparse.Namespace, state: dict[str, str]) -> None:
    """Run the plan; a failing row becomes a row saying why, never the end of the run."""
    skipped: set[str] = set()
    for variant, batch, run in _plan(bench, args):
        if variant == "worker":
            reason = _worker_skip(args)
        else:
            reason = _skip_reason(variant, args, bench.device)
        if reason is not None:
            if variant not in skipped:  # one row per skipped variant, not per batch size
                skipped.add(variant)
                bench.add(Row(variant, note=f"skipped: {reason}"))
            continue
        if not bench.budget.can_start_row():
            bench.add(Row(variant, batch, note="skipped: time budget nearly used up"))
            continue
        state["current"] = variant if batch is None else f"{variant} batch {batch}"
        print(f"[{_elapsed(bench)}] {state['current']} ...", flush=True)
        _restore(bench)
        try:
            row = run()
        except Exception as exc:
            traceback.print_exc()
            lines = str(exc).strip().splitlines()
            row = Row(
                variant,
                batch,
                note=f"failed: {type(exc).__name__}: {lines[0][:200] if lines else ''}",
            )
        finally:
            release(bench.device)
        bench.add(row)


def _restore(bench: Bench) -> None:
    """Undo what the previous row's engine did to the shared model, once noted."""
    if bench.pristine is None:
        return
    before = model_fingerprint(bench.checkpoint.model)
    bench.pristine.restore()
    if before != model_fingerprint(bench.checkpoint.model) and not any(
        "rewrites the model" in note for note in bench.notes
    ):
        bench.notes.append(
            "the engine rewrites the model it is given (e.g. cuts the vision tower); the "
            "bench restores the original modules before every row"
        )


def _elapsed(bench: Bench) -> str:
    return f"t+{time.monotonic() - bench.budget.started:.0f}s"


def main(argv: list[str] | None = None, *, started: float | None = None) -> int:
    """Run the benchmark; `started` (monotonic) is when the time budget began."""
    budget_start = time.monotonic() if started is None else started
    args = parse_args(argv)
    device = _device(args.device)
    _apply_defaults(args, device)
    reserve = 20.0 if device.type == "cuda" else 5.0
    budget = Budget(budget_start, args.time_budget_s, reserve, args.row_time_s)
    print(
        f"llava bench: model {args.model} on {device}, batches {args.batch_list}, "
        f"budget {args.time_budget_s:.0f}s ({budget.remaining():.0f}s left)",
        flush=True,
    )
    scratch = Path(tempfile.mkdtemp(prefix="llava-bench-"))
    CLEANUPS.append(functools.partial(shutil.rmtree, scratch, ignore_errors=True))
    # Until the model is up there is no table to save: just say so and stop at the budget.
    setup_watchdog = _timer(budget.remaining(), _setup_overran)
    try:
        try:
            bench = _setup(args, device, budget, scratch)
        except Exception:
            traceback.print_exc()
            print("setup failed (model or faces): no rows can be measured", flush=True)
            return 1
        finally:
            setup_watchdog.cancel()
        state: dict[str, str] = {}
        finisher = Finisher(bench, args, state)
        watchdog = _timer(budget.remaining(), finisher.on_budget)
        _run_rows(bench, args, state)
        watchdog.cancel()
        finisher.finish(complete=True)
        return 0
    finally:
        run_cleanups()


def _timer(seconds: float, action: Callable[[], None]) -> threading.Timer:
    timer = threading.Timer(max(0.0, seconds), action)
    timer.daemon = True
    timer.start()
    return timer


def _setup_overran() -> None:
    print("time budget reached while building/loading the model: no table", flush=True)
    run_cleanups()
    os._exit(1)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only; GPU hosts have no network
    raise SystemExit(main(started=time.monotonic() - process_age_s()))
