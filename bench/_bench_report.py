"""The benchmark's output: one markdown table, and a JSON of the same rows plus the setup."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from bench._bench_core import Bench, Row, run_cleanups
from bench._variants import VARIANTS

# Exit status when the watchdog cut the run: the table is there, but rows are missing.
PARTIAL_EXIT = 3
# Table order; startup-cold/-warm are bench/gpu_check.py's time-to-ready rows.
VARIANT_ORDER = (
    "startup",
    "startup-cold",
    "startup-warm",
    "naive-generate",
    *VARIANTS,
    "worker-memory",
    "worker-kafka",
)
HEADERS = (
    "variant",
    "batch",
    "images/s",
    "p50 ms",
    "p99 ms",
    "TFLOP/s",
    "% of peak",
    "peak GiB",
    "load s",
    "warm-up s",
    "agree",
    "max Δ",
    "vs engine",
    "note",
)


def environment(device: torch.device) -> dict[str, Any]:
    """Hardware, date and library versions, for the JSON and the table's header."""
    import transformers

    info: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["gpu"] = properties.name
        info["gpu_memory_gib"] = round(properties.total_memory / 2**30, 1)
        info["compute_capability"] = list(torch.cuda.get_device_capability(device))
        info["cuda"] = torch.version.cuda
    return info


def _cell(value: float | None, digits: int, cuda_only: bool, on_cuda: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a" if cuda_only and not on_cuda else ""
    if abs(value) >= 100 and digits <= 2:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if digits >= 0 else f"{value:.3g}"


def cells(row: Row, on_cuda: bool) -> list[str]:
    share = None if row.peak_share is None else row.peak_share * 100
    timed = not row.variant.startswith(("startup", "worker"))
    return [
        row.variant,
        "" if row.batch is None else str(row.batch),
        _cell(row.images_per_s, 1, False, on_cuda),
        _cell(row.p50_ms, 2, False, on_cuda),
        _cell(row.p99_ms, 2, False, on_cuda),
        _cell(row.tflops, -1, False, on_cuda),
        _cell(share, 1, timed, on_cuda),
        _cell(row.peak_gib, 2, timed, on_cuda),
        _cell(row.load_s, 1, False, on_cuda),
        _cell(row.warmup_s, 2, False, on_cuda),
        _cell(row.agreement, 3, False, on_cuda),
        _cell(row.max_abs_diff, -1, False, on_cuda),
        _cell(row.ratio_to_engine, 3, False, on_cuda),
        row.note.replace("|", "/"),
    ]


def sorted_rows(rows: list[Row]) -> list[Row]:
    """Grouped by variant in a fixed order, batches ascending (rows run largest first)."""

    def key(row: Row) -> tuple[int, int]:
        order = VARIANT_ORDER.index(row.variant) if row.variant in VARIANT_ORDER else 99
        return order, row.batch or 0

    return sorted(rows, key=key)


def markdown(bench: Bench, title: str) -> str:
    """The table with a short header of what was measured where."""
    with bench.lock:
        rows = list(bench.rows)
    return render(title, bench.notes, rows, bench.device.type == "cuda")


def render(title: str, notes: list[str], rows: list[Row], on_cuda: bool) -> str:
    """Title, the notes as a list, then the rows as one markdown table."""
    lines = [f"### {title}", ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(cells(row, on_cuda)) + " |" for row in sorted_rows(rows)]
    return "\n".join(lines) + "\n"


def write_outputs(
    bench: Bench, out: Path, stem: str, title: str, extra: dict[str, Any]
) -> tuple[Path, Path]:
    """Print the table and write it as <stem>.md and <stem>.json under `out`."""
    text = markdown(bench, title)
    print("\n" + text, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    table_path, json_path = out / f"{stem}.md", out / f"{stem}.json"
    table_path.write_text(text, encoding="utf-8")
    with bench.lock:
        rows = [dataclasses.asdict(row) for row in sorted_rows(list(bench.rows))]
    payload = _finite({**extra, "notes": bench.notes, "rows": rows})
    json_path.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    print(f"wrote {table_path} and {json_path}", flush=True)
    return table_path, json_path


def _finite(data: Any) -> Any:
    """NaN -> None: json.dumps would write NaN, which strict JSON readers reject."""
    if isinstance(data, dict):
        return {key: _finite(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_finite(item) for item in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


class Finisher:
    """Writes the outputs exactly once: at the end, or from the watchdog at the budget."""

    def __init__(self, bench: Bench, args: argparse.Namespace, state: dict[str, str]) -> None:
        self.bench, self.args, self.state = bench, args, state
        self._once = threading.Lock()
        stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        self.stem = f"llava-bench-{args.model}-{bench.device.type}-{stamp}"
        self.paths: tuple[Path, Path] | None = None

    def finish(self, complete: bool) -> bool:
        """Write table + JSON; False if the other thread already did."""
        if not self._once.acquire(blocking=False):
            return False
        if not complete:
            self.bench.notes.append(
                f"TIME BUDGET of {self.args.time_budget_s:.0f}s reached during "
                f"{self.state.get('current', 'setup')}: the rows after it are missing"
            )
        info = environment(self.bench.device)
        title = f"LLaVA engine benchmark: {self.args.model} on {info.get('gpu', info['cpu'])}"
        self.bench.notes.insert(0, versions_line(info))
        extra = {
            "environment": info,
            "complete": complete,
            "args": vars(self.args),
            "flops_per_image": self.bench.flops_per_image,
        }
        self.paths = write_outputs(self.bench, self.args.out, self.stem, title, extra)
        return True

    def on_budget(self) -> None:
        """Timer thread: the main thread may be stuck in a long compile; write and exit."""
        try:
            if self.finish(complete=False):
                print("time budget reached: exiting with the rows measured so far", flush=True)
            run_cleanups()
        finally:
            os._exit(PARTIAL_EXIT)


def versions_line(info: dict[str, Any]) -> str:
    gpu = (
        f"{info['gpu']} (cc {info['compute_capability']}, CUDA {info['cuda']}), "
        if "gpu" in info
        else ""
    )
    return (
        f"{info['date']}; {gpu}{info['cpu_count']} CPUs; torch {info['torch']}, "
        f"transformers {info['transformers']}, Python {info['python']}"
    )
