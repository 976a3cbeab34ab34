"""Benchmark the LLaVA emotion engine's variants and the whole worker: one markdown table.

Per engine variant and batch size: throughput, latency, FLOP/s, memory and label agreement;
plus the whole worker end to end (on the in-memory broker; on Kafka too where one is at hand).

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
from collections.abc import Callable, Iterator
from pathlib import Path

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
)
from bench._bench_options import (
    apply_defaults,
    asked_variants,
    device_of,
    load_model,
    parse_args,
)
from bench._bench_report import Finisher
from bench._bench_rows import engine_row, naive_row
from bench._bench_worker import memory_worker_row
from bench._bench_worker_kafka import broker_unavailable, kafka_worker_row
from bench._llava_shapes import (
    SHAPES,
    count_params,
    meta_param_count,
    params_text,
    prompt_flops,
)
from bench._variants import VARIANTS, skip_reason, variant_settings
from consumer.config import ModelSettings
from consumer.engine import EmotionEngine
from consumer.engine.scoring import label_token_ids

REPO = Path(__file__).resolve().parent.parent
Plan = Iterator[tuple[str, int | None, Callable[[], Row]]]


def _setup(args: argparse.Namespace, device: torch.device, budget: Budget, scratch: Path) -> Bench:
    """Faces, model and prompt; then the startup row (which may fail without ending the run)."""
    wanted = max(max(args.batch_list), args.agree_faces)
    files = 0 if args.no_worker else args.worker_events
    faces, folder, face_note = load_faces(args.data, wanted, scratch, files)
    print(f"faces: {face_note}", flush=True)
    reset_peak(device)
    started = time.perf_counter()
    checkpoint, what = load_model(args.model, args.model_path, device, scratch)
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


def _plan(bench: Bench, args: argparse.Namespace) -> Plan:
    """(variant, batch, run) in execution order, cheap and important first.

    Larger batches run first within a variant: they give the headline throughput, and the
    budget cuts the rows at the end. compiled is last: each of its rows compiles a 7B
    graph (tens of seconds), so it is what the budget should cut. A generator, so that
    "best" batches and the worker rows' batch are chosen after the eager rows ran.
    """
    for size in sorted(args.batch_list, reverse=True):
        yield "eager", size, functools.partial(engine_row, bench, "eager", size)
    # The rest in VARIANTS order, the processor-preprocess ablation first and compiled last;
    # between them the baseline and the whole worker, which need only the eager rows.
    rest = [name for name in VARIANTS if name not in ("eager", "processor-preprocess")]
    rest.sort(key=lambda name: name == "compiled")  # stable: the others keep their order
    for variant in ["processor-preprocess", "naive-generate", "worker", *rest]:
        if variant == "naive-generate":
            yield variant, 1, lambda: naive_row(bench)
        elif variant == "worker":
            best = _best_eager_batch(bench, args)
            for broker in ("memory", "kafka"):
                yield f"worker-{broker}", best, functools.partial(_worker_row, bench, args, broker)
        else:
            for size in _other_batches(bench, args):
                yield variant, size, functools.partial(engine_row, bench, variant, size)


def _other_batches(bench: Bench, args: argparse.Namespace) -> list[int]:
    """--other-batches with "best" resolved, largest first."""
    best = _best_eager_batch(bench, args)
    sizes = {best if size == "best" else int(size) for size in args.other_list}
    return sorted(sizes, reverse=True)


def _best_eager_batch(bench: Bench, args: argparse.Namespace) -> int:
    """The batch size of the fastest eager row (the largest if none was measured)."""
    largest: int = max(args.batch_list)
    eager = [r for r in bench.rows if r.variant == "eager" and r.images_per_s]
    if not eager:
        return largest
    return max(eager, key=lambda r: r.images_per_s or 0.0).batch or largest


def _worker_row(bench: Bench, args: argparse.Namespace, broker: str) -> Row:
    batch = _best_eager_batch(bench, args)
    if broker == "memory":
        return memory_worker_row(bench, batch, args.worker_events, args.worker_images)
    images, servers = args.worker_images, args.bootstrap_servers
    return kafka_worker_row(bench, batch, args.worker_events, images, servers)


def _worker_skip(args: argparse.Namespace, broker: str) -> str | None:
    """Why the worker row on `broker` (memory or kafka) does not run (None: it runs)."""
    if args.no_worker:
        return "--no-worker"
    wanted = args.worker_broker
    if broker == "memory":
        return None if wanted in ("auto", "memory", "both") else f"--worker-broker {wanted}"
    if wanted == "memory":
        return "--worker-broker memory"
    try:
        return broker_unavailable(args.bootstrap_servers)
    except Exception as exc:  # deploy/ missing or broken: the other rows still count
        return f"cannot check for a broker: {exc}"


def _run_rows(bench: Bench, args: argparse.Namespace, state: dict[str, str]) -> None:
    """Run the plan; a failing row becomes a row saying why, never the end of the run."""
    skipped: set[str] = set()
    asked = asked_variants(args)
    for variant, batch, run in _plan(bench, args):
        if variant.startswith("worker-"):
            reason = _worker_skip(args, variant.removeprefix("worker-"))
        elif variant == "naive-generate":
            reason = None if asked is None or variant in asked else "not in --variants"
        else:
            reason = skip_reason(variant, asked, bench.device)
        if reason is not None:
            if variant not in skipped:  # one row per skipped variant, not per batch size
                skipped.add(variant)
                bench.add(Row(variant, note=f"skipped: {reason}"))
            continue
        if not bench.budget.can_start_row():
            bench.add(Row(variant, batch, note="skipped: time budget nearly used up"))
            continue
        state["current"] = f"{variant} batch {batch}"
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
    args = parse_args(argv, (__doc__ or "").splitlines()[0])
    device = device_of(args.device)
    apply_defaults(args, device)
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
