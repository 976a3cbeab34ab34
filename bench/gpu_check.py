"""The GPU check: engine modes, the whole worker and time to ready, in one table.

Run by bench/gpu_check.sh, which first puts the packages the GPU host lacks on PYTHONPATH
(from the wheels `make gpu-wheels` downloads). Three processes, one after the other, each
bounded by a timeout cut from one budget (--budget-s, default 350 s, counted from --started,
when the shell script began):

1. `bench.llava_bench`: every engine mode (bench/_variants.py ENGINE_MODES: eager, fp8,
   int8, compiled; the ones this engine or GPU cannot run become skipped rows) at batch 1
   and at the fastest eager batch, and `worker-memory`: the unchanged Worker on the
   in-memory broker with images fetched over loopback HTTP, against eager at that batch.
2. `bench.startup_check --label cold`: time to ready (engine construction + warm_up(), the
   worker's default settings) with an empty TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR.
3. the same, `--label warm`, on the cache the cold run filled: a worker restarting.

Without CUDA (or with --quick) it runs the tiny model with short settings and forces
compilation in the startup runs, so the whole path is exercised on a CPU in ~2 minutes.
Writes gpu-check-<UTC time>.md / .json under --out, and the parts (the bench's own table,
the startup JSONs) in a folder of the same name; the compile caches live in a temporary
folder, deleted at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._bench_core import Row
from bench._bench_report import render
from bench._variants import ENGINE_MODES

REPO = Path(__file__).resolve().parent.parent
# Each phase's share of the budget: (CUDA, quick) seconds kept back for the startup runs.
COLD_S = (110.0, 75.0)
WARM_S = (60.0, 35.0)
MARGIN_S = 10.0  # ending a phase that overran (SIGTERM, SIGKILL) and writing the table
# The worker's default, precision "auto", is what the startup rows measure.
DEFAULT_VARIANTS = tuple(name for name in ENGINE_MODES if name != "precision-auto")


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=(__doc__ or "").splitlines()[0]
    )
    add = parser.add_argument
    add("--quick", action="store_true", default=_env("GPU_CHECK_QUICK", "0") == "1")
    add("--out", type=Path, default=Path(_env("OUT", str(REPO / ".cache" / "bench"))))
    add("--budget-s", type=float, default=float(_env("GPU_CHECK_BUDGET_S", "350")))
    add("--started", type=float, help="epoch seconds the budget counts from (default: now)")
    add("--variants", default=os.environ.get("GPU_CHECK_VARIANTS"), help="comma list")
    add("--batches", default=os.environ.get("GPU_CHECK_BATCHES"), help="eager batch sizes")
    add("--startup-batch", type=int, default=int(_env("GPU_CHECK_STARTUP_BATCH", "0")) or None)
    add("--worker-events", type=int, default=int(_env("GPU_CHECK_WORKER_EVENTS", "0")) or None)
    return parser.parse_args(argv)


class Clock:
    """The one budget: how much is left, as wall-clock seconds from --started."""

    def __init__(self, started: float, budget_s: float) -> None:
        self.started = started
        self.deadline = started + budget_s

    def left(self) -> float:
        return self.deadline - time.time()

    def elapsed(self) -> float:
        return time.time() - self.started


def run_phase(name: str, command: list[str], env: dict[str, str], timeout_s: float) -> int | None:
    """Run `command` in its own process group; None if it ran past `timeout_s` (then the
    whole group is ended: the bench's image server, decoders and compile workers too)."""
    print(f"\n== {name} (at most {timeout_s:.0f}s): {' '.join(command[2:])}", flush=True)
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True)
    try:
        return process.wait(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        print(f"== {name}: time limit reached, stopping it", flush=True)
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)  # the group this Popen made (start_new_session)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        return None


def _cache_env(folder: Path, fresh: bool) -> dict[str, str]:
    """Environment with the compile caches in `folder` (emptied first when `fresh`)."""
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"),
        "TRITON_CACHE_DIR": str(folder / "triton"),
        "HF_HUB_OFFLINE": "1",
    }


def bench_command(args: argparse.Namespace, quick: bool, out: Path, budget_s: float) -> list[str]:
    variants = args.variants or ",".join(
        name for name in DEFAULT_VARIANTS if not (quick and name == "compiled")
    )
    command = [sys.executable, "-m", "bench.llava_bench", "--variants", variants]
    command += ["--batch-sizes", args.batches or ("1,16" if quick else "1,8,32")]
    command += ["--other-batches", "1,best", "--worker-broker", "memory"]
    command += ["--time-budget-s", f"{budget_s:.0f}", "--out", str(out)]
    if args.worker_events:
        command += ["--worker-events", str(args.worker_events)]
    if quick:
        command += ["--model", "tiny", "--device", "cpu", "--iterations", "5"]
        command += ["--row-time-s", "2", "--agree-faces", "16"]
        command += [] if args.worker_events else ["--worker-events", "100"]
    else:
        command += ["--row-time-s", "4"]
    return command


def startup_command(label: str, quick: bool, batch: int, out: Path) -> list[str]:
    command = [sys.executable, "-m", "bench.startup_check", "--label", label]
    command += ["--batch", str(batch), "--out", str(out)]
    if quick:  # the worker would not compile on a CPU; forced, to exercise the cache
        command += ["--model", "tiny", "--device", "cpu", "--compile", "on"]
    return command


def startup_row(label: str, path: Path, code: int | None, limit_s: float) -> Row:
    """A table row from a startup_check JSON (complete, cut short, or missing)."""
    row = Row(f"startup-{label}")
    if not path.exists():
        row.note = f"no result (exit {code})"
        return row
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    row.batch, row.load_s = data.get("batch"), data.get("load_s")
    row.warmup_s, row.images_per_s = data.get("ready_s"), data.get("images_per_s")
    row.p50_ms = data.get("p50_ms")
    calls = ", ".join(f"{size}: {seconds:.1f}s" for size, seconds in data["warmup_calls"])
    parts = []
    if data.get("complete"):
        parts.append(
            f"time to ready {data['ready_s']:.1f}s = construction {data['construct_s']:.1f}s "
            f"+ warm_up {data['warmup_s']:.1f}s"
        )
    elif code is None:
        parts.append(f"CUT at the {limit_s:.0f}s limit")
    else:
        parts.append(f"failed (exit {code})")
    parts.append(f"warm-up calls by batch [{calls}] of buckets {data.get('buckets', '?')}")
    parts.append(f"compiled {data.get('compiled')}, precision {data.get('precision')}")
    imports, load = data.get("import_s") or 0.0, data.get("load_s") or 0.0
    parts.append(f"imports {imports:.1f}s, load/build {load:.1f}s (not in time to ready)")
    parts.append("compile cache empty at start" if label == "cold" else "the cold run's cache")
    row.note = "; ".join(parts)
    row.details = {"import_s": imports, "construct_s": data.get("construct_s") or 0.0}
    return row


def _bench_json(folder: Path) -> dict[str, Any]:
    found = sorted(folder.glob("llava-bench-*.json"))
    return json.loads(found[-1].read_text(encoding="utf-8")) if found else {}


def summary(rows: list[Row]) -> list[str]:
    """The headline numbers: the worker against its engine, and cold/warm time to ready."""
    lines = []
    for row in rows:
        if row.variant == "worker-memory" and row.ratio_to_engine is not None:
            verdict = "meets" if row.ratio_to_engine >= 0.97 else "BELOW"
            lines.append(
                f"worker-memory: {row.ratio_to_engine:.3f}x the eager engine at batch "
                f"{row.batch} ({verdict} the 0.97 target)"
            )
    ready = {r.variant: r.warmup_s for r in rows if r.variant.startswith("startup-")}
    if ready.get("startup-cold") and ready.get("startup-warm"):
        lines.append(
            f"time to ready: cold {ready['startup-cold']:.1f}s, warm {ready['startup-warm']:.1f}s"
        )
    return lines


def measure(
    args: argparse.Namespace, clock: Clock, quick: bool, parts: Path, caches: Path
) -> tuple[list[Row], list[str], Any]:
    """The three phases: the table's rows, the notes above it, the bench's environment."""
    index = 1 if quick else 0
    bench_s = clock.left() - COLD_S[index] - WARM_S[index] - MARGIN_S
    bench_env = _cache_env(caches / "bench", fresh=True)
    command = bench_command(args, quick, parts / "bench", bench_s)
    bench_code = run_phase("engine modes + worker-memory", command, bench_env, bench_s + 20)
    startup_env = _cache_env(caches / "startup", fresh=True)
    startup_batch = args.startup_batch or (2 if quick else 1)
    results = []
    for label in ("cold", "warm"):
        limit = clock.left() - MARGIN_S - (WARM_S[index] if label == "cold" else 0.0)
        path = parts / f"startup-{label}.json"
        command = startup_command(label, quick, startup_batch, path)
        code = run_phase(f"startup {label}", command, startup_env, limit)
        results.append(startup_row(label, path, code, limit))
    bench = _bench_json(parts / "bench")
    known = {f.name for f in dataclasses.fields(Row)}
    rows = [Row(**{k: v for k, v in r.items() if k in known}) for r in bench.get("rows", [])]
    rows += results
    notes = summary(rows) + list(bench.get("notes", []))
    if bench_code != 0:
        notes.append(f"bench.llava_bench ended with {bench_code} (None: cut at its time limit)")
    return rows, notes, bench.get("environment")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clock = Clock(args.started or time.time(), args.budget_s)
    import torch  # after the options: --help should not wait for torch

    cuda = torch.cuda.is_available()
    quick = args.quick or not cuda
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out.resolve()
    parts = out / f"gpu-check-{stamp}"
    print(f"gpu check: {'quick (tiny model, CPU)' if quick else 'CUDA'}, {clock.left():.0f}s left")
    # Compile caches (GBs for a 7B) stay out of $OUT, and go when the check is done.
    caches = Path(tempfile.mkdtemp(prefix="gpu-check-caches-"))
    try:
        rows, notes, environment = measure(args, clock, quick, parts, caches)
    finally:
        shutil.rmtree(caches, ignore_errors=True)
    notes.append(f"wall time {clock.elapsed():.0f}s of a {args.budget_s:.0f}s budget")
    title = f"GPU check: {'tiny model, quick' if quick else 'LLaVA-1.5-7B shape'}"
    text = render(title, notes, rows, cuda and not quick)
    print("\n" + text, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu-check-{stamp}.md").write_text(text, encoding="utf-8")
    payload = {
        "environment": environment,
        "quick": quick,
        "budget_s": args.budget_s,
        "wall_s": clock.elapsed(),
        "notes": notes,
        "rows": [dataclasses.asdict(row) for row in rows],
        "options": vars(args),
    }
    (out / f"gpu-check-{stamp}.json").write_text(
        json.dumps(payload, indent=2, default=str), encoding="utf-8"
    )
    print(f"wrote {out}/gpu-check-{stamp}.md and .json (parts in {parts})", flush=True)
    return 0 if any(not row.variant.startswith("startup-") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
