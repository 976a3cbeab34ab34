"""Rows of the LLaVA benchmark: the shared state, faces, timing loops and label agreement."""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

# Run by the watchdog before it exits the process hard (a broker to stop, a folder to delete).
CLEANUPS: list[Callable[[], object]] = []


@dataclass(slots=True)
class Row:
    """One line of the table; None prints as an empty cell."""

    variant: str
    batch: int | None = None
    images_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    tflops: float | None = None
    peak_share: float | None = None
    peak_gib: float | None = None
    load_s: float | None = None
    warmup_s: float | None = None
    agreement: float | None = None
    max_abs_diff: float | None = None
    ratio_to_engine: float | None = None  # worker rows: their results/s over eager images/s
    note: str = ""
    # Named numbers behind the note (worker rows: where the time went), for the JSON.
    details: dict[str, float] = field(default_factory=dict)


class Budget:
    """The global time budget, counted from process start so imports are included."""

    def __init__(self, started: float, total_s: float, reserve_s: float, row_cap_s: float):
        self.started = started
        self.deadline = started + total_s
        self.reserve_s = reserve_s
        self.row_cap_s = row_cap_s

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def can_start_row(self) -> bool:
        """False once so little is left that a row would likely be cut by the watchdog."""
        return self.remaining() > self.reserve_s

    def row_deadline(self, cap_s: float | None = None) -> float:
        """When a row's timing loop stops: its cap, or well before the global end."""
        cap = self.row_cap_s if cap_s is None else cap_s
        return min(time.monotonic() + cap, self.deadline - self.reserve_s / 2)


@dataclass
class Bench:
    """Everything the rows share; `rows` is read by the watchdog thread under `lock`."""

    device: torch.device
    checkpoint: Any  # LoadedCheckpoint
    base_settings: dict[str, Any]
    faces: list[Image.Image]
    agree_faces: list[Image.Image]
    face_folder: Path
    flops_per_image: float
    peak_tflops: float | None
    iterations: int
    budget: Budget
    pristine: ModuleTree | None = None  # the model as built, restored before every row
    reference: list[Any] = field(default_factory=list)  # eager FaceScores of agree_faces
    labels: tuple[str, ...] = ()
    label_token_ids: tuple[int, ...] = ()
    prompt_text: str = ""
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, row: Row) -> None:
        with self.lock:
            self.rows.append(row)
        rate = "" if row.images_per_s is None else f"{row.images_per_s:.1f}/s "
        print(f"  -> {row.variant} batch {row.batch}: {rate}{row.note}", flush=True)


def image_files(folder: Path, limit: int) -> list[Path]:
    """consumer.event_source.image_files (round robin over class folders), or a fallback
    when confluent_kafka, which that module imports, is not installed."""
    try:
        from consumer.event_source import image_files as listed
    except ImportError:
        paths = sorted(p for p in folder.rglob("*.png") if p.is_file())
        return paths[:limit]
    return listed(folder, limit=limit)


def load_faces(
    folder: Path, count: int, scratch: Path, files: int
) -> tuple[list[Image.Image], Path, str]:
    """`count` faces from `folder`, else synthetic ones (`files` of them written under
    `scratch`, for the worker row to publish); returns faces, their folder and a note."""
    if folder.is_dir():
        paths = image_files(folder, count)
        if paths:
            faces = []
            for path in paths:
                with Image.open(path) as image:
                    faces.append(image.copy())
            return faces, folder, f"{len(faces)} real faces from {folder}"
    synthetic = scratch / "synthetic-faces"
    faces = [synthetic_face(index) for index in range(max(count, files))]
    for index, face in enumerate(faces):
        # One folder per fake class, like FER, so the worker row can publish them too.
        target = synthetic / f"class{index % 7}" / f"im{index}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        face.save(target)
    note = f"{folder} is missing: SYNTHETIC 48x48 cartoon faces instead of real ones"
    return faces[:count], synthetic, note


def synthetic_face(index: int) -> Image.Image:
    """A 48x48 grayscale cartoon face that differs per index (not a real expression)."""
    generator = torch.Generator().manual_seed(index)
    noise = torch.randint(0, 40, (48, 48), generator=generator, dtype=torch.uint8)
    image = Image.fromarray(noise.numpy(), mode="L")
    draw = ImageDraw.Draw(image)
    shade = 120 + (index * 37) % 100
    draw.ellipse((6, 4, 42, 46), fill=shade)
    for x in (16, 32):
        draw.ellipse((x - 3, 17, x + 3, 22), fill=30)
    bend = (index % 5) * 3 - 6  # frown .. smile
    draw.arc(
        (15, 28 - abs(bend), 33, 36 + abs(bend)),
        0 if bend > 0 else 180,
        180 if bend > 0 else 360,
        fill=20,
        width=2,
    )
    return image


def take(faces: Sequence[Image.Image], count: int) -> list[Image.Image]:
    """`count` faces, cycling when there are fewer."""
    return [faces[i % len(faces)] for i in range(count)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def release(device: torch.device) -> None:
    """Drop what a finished row left behind so the next row's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(
    run: Callable[[], object], device: torch.device, iterations: int, deadline: float
) -> list[float]:
    """Seconds per call; stops early at `deadline` but always measures twice."""
    times: list[float] = []
    for _ in range(iterations):
        if len(times) >= 2 and time.monotonic() > deadline:
            break
        started = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - started)
    return times


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (with few samples p99 is simply the slowest)."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(share * len(ordered) + 0.5) - 1))
    return ordered[rank]


def throughput(bench: Bench, row: Row, times: Sequence[float], images: int) -> None:
    """Fill images/s, latencies and TFLOP/s of `row` from per-batch seconds."""
    median = statistics.median(times)
    row.images_per_s = images / median
    row.p50_ms = median * 1000
    row.p99_ms = percentile(times, 0.99) * 1000
    row.tflops = row.images_per_s * bench.flops_per_image / 1e12
    if bench.peak_tflops and bench.device.type == "cuda":
        row.peak_share = row.tflops / bench.peak_tflops


def agreement(results: Sequence[Any], reference: Sequence[Any]) -> tuple[float, float]:
    """(share of equal argmax labels, max abs score difference) against the reference."""
    pairs = list(zip(results, reference, strict=False))
    if not pairs:
        return float("nan"), float("nan")
    same = sum(1 for mine, ref in pairs if mine.label == ref.label)
    diff = max(abs(mine.scores[k] - ref.scores[k]) for mine, ref in pairs for k in ref.scores)
    return same / len(pairs), diff


class ModuleTree:
    """Every module's children, parameters and buffers (shallow), to undo in-place rewrites.

    The engine edits the model it is given (it cuts the vision tower after the layer LLaVA
    reads; fp8 swaps nn.Linear for FP8Linear), so a second engine or HF generate() on the
    same model would see the first one's edits. Restoring the dicts puts the original
    module objects back; no weights are copied.
    """

    def __init__(self, model: Any) -> None:
        self._saved = [
            (module, dict(module._modules), dict(module._parameters), dict(module._buffers))
            for module in model.modules()
        ]

    def restore(self) -> None:
        for module, children, parameters, buffers in self._saved:
            for current, saved in (
                (module._modules, children),
                (module._parameters, parameters),
                (module._buffers, buffers),
            ):
                current.clear()
                current.update(saved)


def model_fingerprint(model: Any) -> tuple[Any, ...]:
    """Module types and counts, parameter dtypes and compiled modules: tells whether a row
    rewrote the shared model in place."""
    modules = list(model.modules())
    types = Counter(type(m).__name__ for m in modules)
    dtypes = Counter(str(p.dtype) for p in model.parameters())
    compiled = sum(1 for m in modules if getattr(m, "_compiled_call_impl", None) is not None)
    return tuple(sorted(types.items())), tuple(sorted(dtypes.items())), compiled


def process_age_s() -> float:
    """Seconds since this process started (Linux), so the budget includes the imports."""
    try:
        stat = Path("/proc/self/stat").read_text(encoding="utf-8")
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime
        uptime = float(Path("/proc/uptime").read_text(encoding="utf-8").split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def run_cleanups() -> None:
    """Run and forget the registered cleanups, newest first; never raises."""
    while CLEANUPS:
        action = CLEANUPS.pop()
        try:
            action()
        except Exception as exc:
            print(f"cleanup failed: {exc}", flush=True)
