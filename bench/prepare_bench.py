"""Fetch + decode + crop on one CPU core: `python -m bench.prepare_bench`.

How many images one CPU core prepares per second (fetch over HTTP, decode, find or check
the faces, crop), and so how many cores one GPU worker needs to keep its LLaVA engine fed.
The rows:

* ``fer48-png``: FER-2013's own 48x48 grayscale PNGs, the whole image as the face
  (faces.detector="none"), as the worker sees pre-cropped input;
* ``1080p-boxes``: 1920x1080 JPEG frames (quality 90) with 3 FER faces pasted on busy
  backgrounds (bench/_frames.py), the boxes given by the event;
* ``1080p-haar``: the same frames without boxes: OpenCV's Haar cascade finds the faces
  (faces.detector="haar", detect_max_side and the rest at their defaults);
* ``720p-haar``: 1280x720 frames made the same way, also detected;
* ``...+process``: as its in-process row, but decoded, detected and cropped by a
  ``ProcessDecoder`` (decode.isolation="process", the default) on the same core: the
  difference is what handing the image to a decoder process costs per image;
* ``1080p-boxes+process+glibc-defaults``: the same with glibc's own malloc thresholds
  (GLIBC_DEFAULT_ENV) instead of the decoder pool's, which return each frame's buffers to
  the kernel: what the pool's thresholds save.

Honest about the core: the images are served by a ThreadingHTTPServer (HTTP/1.1
keep-alive) in a separate process pinned to the other CPUs, so its work is not counted,
and fetched with consumer.fetch.http through the worker's keep-alive pool. The measuring
process is pinned to one CPU (os.sched_setaffinity) and single-threaded (OpenCV's thread
pool off, OMP_NUM_THREADS=1), and runs one image at a time; a decoder process inherits
the pin. The stages are timed one by one with the worker's own functions (fetch_bytes,
decode_image, the detector, event_boxes/whole_image, crop_faces) in FrameCropper's order;
a check at warm-up makes sure that split still gives FrameCropper's boxes.

Everything is counted in CPU time (this process's threads, and in +process rows the
decoder process's, from /proc), not wall time: on a shared machine other tenants of the
core would otherwise count as this work, and waiting for the server is not core time.
images/s per core is the median over --repeats runs (N frames, 4N with event boxes, 40N
FER images per run) of images per CPU-second; the per-stage columns are medians over every
image (thread CPU time). The engine's unit is faces, so for frames with k faces the worker
needs engine_rate / k frames per second: cores = engine_rate / k / (images/s on one core).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import cv2
import PIL
from PIL import Image, features

from bench._frames import FER_FACES, compose_frames, fer_faces
from consumer.config import DecodeSettings, FaceSettings, FetchSettings
from consumer.decode.decoding import FrameCropper
from consumer.decode.faces import crop_faces, event_boxes, grow, whole_image
from consumer.decode.images import decode_image
from consumer.decode.pool import ProcessDecoder
from consumer.fetch.pool import close_idle_connections
from consumer.fetch.references import fetch_bytes
from schemas import FaceBox

REPO = Path(__file__).resolve().parent.parent
# The engine targets on one H100-class GPU (docs/benchmarks.md), in faces per second.
ENGINE_RATES: tuple[tuple[str, float], ...] = (("bf16", 68.0), ("fp8", 100.0))
# FER rows are ~100x cheaper per image than frame rows: this many times N, so that a run
# is long enough to time.
FER_PER_IMAGE = 40
# The 1080p rows with event boxes go through their frames this many times per run.
BOXES_PASSES = 4
FACES_PER_FRAME = 3
JPEG_QUALITY = 90
# glibc's default malloc thresholds (128 KiB), for the extra decoder-process row: the
# decoder pool itself raises them to 64 MiB / 256 MiB so a frame's buffers stay mapped.
GLIBC_DEFAULT_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
HEADERS = (
    "row",
    "input",
    "faces/img",
    "img/s/core",
    "fetch ms",
    "decode ms",
    "detect ms",
    "crop ms",
    "decoder call ms",
    "IPC ms",
    "cores @68 faces/s",
    "cores @100 faces/s",
)


@dataclass(frozen=True)
class Item:
    """One image the server holds: its URL path, bytes and the event's boxes (if any)."""

    path: str
    data: bytes
    boxes: list[FaceBox] | None


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    items: list[Item]
    faces: FaceSettings
    pasted_faces: int | None = None  # the true faces per frame, where frames were composed
    passes: int = 1  # times each run goes through the items (cheap rows: a longer run)

    @property
    def run_items(self) -> list[Item]:
        return self.items * self.passes


@dataclass
class Result:
    """One table row's numbers (None: not measured in this row)."""

    row: str
    description: str
    images_per_s: float
    faces_per_image: float
    fetch_ms: float
    decode_ms: float | None = None
    detect_ms: float | None = None
    crop_ms: float | None = None
    decoder_call_ms: float | None = None
    ipc_ms: float | None = None
    images: int = 0  # per run
    repeats: int = 0
    wall_images_per_s: float = 0.0  # by the clock on the wall: lower when others share the core
    cpu_share: float = 1.0
    notes: list[str] = field(default_factory=list)

    def cores(self, engine_faces_per_s: float) -> float | None:
        """Cores of this kind that keep an engine at `engine_faces_per_s` busy."""
        if self.faces_per_image <= 0:
            return None  # no faces found: the engine gets nothing from these images
        return engine_faces_per_s / self.faces_per_image / self.images_per_s


# ---- inputs ---------------------------------------------------------------------------------


def fer_files(root: Path, count: int) -> list[Path]:
    """`count` FER PNGs, round robin over the class folders, in name order."""
    if not root.is_dir():
        raise SystemExit(f"FER-2013 faces missing at {root}; pass --data or set FER2013_TRAIN")
    classes = [sorted(d.glob("*.png")) for d in sorted(root.iterdir()) if d.is_dir()]
    classes = [paths for paths in classes if paths]
    return [classes[i % len(classes)][i // len(classes)] for i in range(count)]


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def build_workloads(images: int, root: Path, seed: int) -> list[Workload]:
    """The inputs of every row, encoded as the server will send them."""
    fer = [
        Item(f"/fer/{i}.png", path.read_bytes(), None)
        for i, path in enumerate(fer_files(root, images * FER_PER_IMAGE))
    ]
    frame_sets = {}
    for label, size, face_px in (
        ("1080p", (1920, 1080), (120, 260)),
        ("720p", (1280, 720), (80, 180)),
    ):
        faces = fer_faces(images * FACES_PER_FRAME, seed, root)
        frames = compose_frames(
            faces,
            images,
            seed,
            name=label,
            sizes=(size,),
            faces_per_frame=(FACES_PER_FRAME, FACES_PER_FRAME),
            face_px=face_px,
        )
        frame_sets[label] = [
            (f"/{label}/{i}.jpg", _jpeg(f.image), list(f.faces)) for i, f in enumerate(frames)
        ]
    boxed = [Item(path, data, boxes) for path, data, boxes in frame_sets["1080p"]]
    bare = {
        label: [Item(path, data, None) for path, data, _ in frames]
        for label, frames in frame_sets.items()
    }
    mean_kb = {
        label: statistics.mean(len(d) for _, d, _ in frames) / 1024
        for label, frames in frame_sets.items()
    }
    haar = FaceSettings(detector="haar")
    jpeg = f"JPEG q{JPEG_QUALITY}"
    return [
        Workload(
            "fer48-png",
            f"FER 48x48 PNG ({statistics.mean(len(i.data) for i in fer) / 1024:.1f} KiB), "
            "whole image",
            fer,
            FaceSettings(),
        ),
        Workload(
            "1080p-boxes",
            f"1920x1080 {jpeg} ({mean_kb['1080p']:.0f} KiB), {FACES_PER_FRAME} event boxes",
            boxed,
            FaceSettings(),
            FACES_PER_FRAME,
            BOXES_PASSES,
        ),
        Workload(
            "1080p-haar",
            f"1920x1080 {jpeg} ({mean_kb['1080p']:.0f} KiB), Haar detection",
            bare["1080p"],
            haar,
            FACES_PER_FRAME,
        ),
        Workload(
            "720p-haar",
            f"1280x720 {jpeg} ({mean_kb['720p']:.0f} KiB), Haar detection",
            bare["720p"],
            haar,
            FACES_PER_FRAME,
        ),
    ]


# ---- the image server (its own process) --------------------------------------------------


def _serve(files: dict[str, bytes], cpus: list[int], conn: Connection) -> None:
    """Serve `files` by path on 127.0.0.1 over HTTP/1.1 keep-alive until terminated."""
    if cpus:
        os.sched_setaffinity(0, cpus)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as image stores and CDNs answer
        # Headers and body go out in two writes: without TCP_NODELAY the body can wait for
        # the client's delayed ACK (tens of ms) and the bench would time the kernel.
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header(
                "Content-Type", "image/jpeg" if self.path.endswith(".jpg") else "image/png"
            )
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    conn.send(int(httpd.server_address[1]))
    httpd.serve_forever()


@contextmanager
def image_server(files: dict[str, bytes], cpus: list[int]) -> Iterator[str]:
    """The server's base URL, e.g. http://127.0.0.1:40123, while the block runs."""
    ctx = multiprocessing.get_context("spawn")  # no fork: the parent may have threads
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_serve, args=(files, cpus, child), daemon=True)
    process.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the bench's image server did not start within 60 s")
        yield f"http://127.0.0.1:{parent.recv()}"
    finally:
        process.terminate()
        process.join(10)
        parent.close()


# ---- measuring ------------------------------------------------------------------------------


@contextmanager
def one_core(cpu: int) -> Iterator[None]:
    """This process (and what it starts meanwhile) on `cpu` only; restored afterwards."""
    before = os.sched_getaffinity(0)
    threads = cv2.getNumThreads()
    omp = os.environ.get("OMP_NUM_THREADS")
    os.sched_setaffinity(0, {cpu})
    cv2.setNumThreads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
        cv2.setNumThreads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def _median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1000


def _cpu_s(pid: int) -> float:
    """CPU seconds used so far by every thread of process `pid` (Linux /proc)."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            # On-CPU nanoseconds, exact; /proc/<pid>/stat would give 10 ms clock ticks.
            total += int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


@dataclass
class Runs:
    """Per-run totals: images, CPU seconds (this process and its decoders), wall seconds."""

    images: list[int] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)

    @contextmanager
    def run(self, images: int, children: Sequence[int] = ()) -> Iterator[None]:
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        child = sum(_cpu_s(pid) for pid in children)
        yield
        child = sum(_cpu_s(pid) for pid in children) - child
        self.cpu_s.append(time.process_time() - cpu + child)
        self.wall_s.append(time.perf_counter() - wall)
        self.images.append(images)

    def per_cpu_s(self) -> float:
        """Median images per CPU-second: images/s on a core nobody else uses."""
        return statistics.median(n / s for n, s in zip(self.images, self.cpu_s, strict=True))

    def per_wall_s(self) -> float:
        return statistics.median(n / s for n, s in zip(self.images, self.wall_s, strict=True))

    def cpu_share(self) -> float:
        """How much of the wall time the core spent on this work (1: nobody else ran)."""
        return sum(self.cpu_s) / sum(self.wall_s)


def _result(row: str, description: str, runs: Runs, found: int, fetch_ms: float) -> Result:
    images = sum(runs.images)
    return Result(
        row,
        description,
        runs.per_cpu_s(),
        found / images,
        fetch_ms,
        images=runs.images[0],
        repeats=len(runs.images),
        wall_images_per_s=runs.per_wall_s(),
        cpu_share=runs.cpu_share(),
    )


def measure_inline(
    work: Workload, base: str, fetch: FetchSettings, repeats: int, warm_up: int
) -> Result:
    """The FrameCropper's steps in this process, each timed in CPU time (thread_time)."""
    cropper = FrameCropper(work.faces, fetch.max_pixels)
    margin = work.faces.margin
    detector = cropper.detector
    times: dict[str, list[float]] = {"fetch": [], "decode": [], "detect": [], "crop": []}
    found_total = 0
    clock = time.thread_time

    def one(item: Item, record: bool) -> list[FaceBox]:
        nonlocal found_total
        t0 = clock()
        data = fetch_bytes(base + item.path, fetch)
        t1 = clock()
        image = decode_image(data, fetch.max_pixels)
        t2 = clock()
        if item.boxes:
            found = event_boxes(image.size, item.boxes, margin)
        elif detector is None:
            found = whole_image(image.size)
        else:
            found = [grow(b, margin, image.size) for b in detector.detect(image)]
        t3 = clock()
        crops = crop_faces(image, found)
        for crop in crops:
            crop.load()
        t4 = clock()
        if record:
            for key, spent in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                times[key].append(spent)
            found_total += len(crops)
        return found

    for item in work.items[:warm_up]:
        got = one(item, record=False)
        # The split above must stay what FrameCropper does, or its numbers mean nothing.
        expected = cropper(item.data, item.boxes).boxes
        if got != expected:
            raise RuntimeError(
                f"{work.name}: the bench's timing split found {got}, FrameCropper {expected}; "
                "consumer.decode.decoding.FrameCropper changed: update bench/prepare_bench.py"
            )
    runs = Runs()
    for _ in range(repeats):
        with runs.run(len(work.run_items)):
            for item in work.run_items:
                one(item, record=True)
    result = _result(work.name, work.description, runs, found_total, _median_ms(times["fetch"]))
    result.decode_ms = _median_ms(times["decode"])
    result.detect_ms = _median_ms(times["detect"])
    result.crop_ms = _median_ms(times["crop"])
    if detector is not None:
        detect = sorted(times["detect"])
        low, high = detect[len(detect) // 10], detect[(len(detect) * 9) // 10]
        result.notes.append(
            f"detect p10-p90 {low * 1000:.0f}-{high * 1000:.0f} ms per frame (it depends on "
            f"the background); {work.pasted_faces} faces pasted per frame, "
            f"{result.faces_per_image:.2f} found"
        )
    return result


@contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set (a decoder process started meanwhile inherits them)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def measure_process(
    work: Workload,
    base: str,
    fetch: FetchSettings,
    repeats: int,
    warm_up: int,
    env: dict[str, str] | None = None,
) -> tuple[Result, float]:
    """Fetch here, decode+detect+crop in one ProcessDecoder process on the same core.

    `env`: extra environment of the decoder process. Also returns how long the decoder
    process took to start (CPU seconds, both sides).
    """
    # No retirement during the run: that cost is reported apart (the start time).
    settings = DecodeSettings(workers=1, max_tasks_per_process=10**9)
    cpu = time.process_time()
    with environ(env or {}):
        decoder = ProcessDecoder(settings, work.faces, fetch.max_pixels, fetch.max_bytes)
    children = decoder.pids()
    if len(children) != 1:
        decoder.close()
        raise RuntimeError(f"expected one decoder process, found {children}")
    start_s = time.process_time() - cpu + _cpu_s(children[0])
    fetch_times: list[float] = []
    calls: list[float] = []  # per run: CPU ms per image of the decoder calls, both sides
    found_total = 0
    runs = Runs()
    try:
        # A whole pass: the decoder process's heap and caches settle over the first images.
        for item in work.items if warm_up else []:
            decoder.decode(fetch_bytes(base + item.path, fetch), item.boxes)
        for _ in range(repeats):
            fetched = len(fetch_times)
            with runs.run(len(work.run_items), children):
                for item in work.run_items:
                    t0 = time.thread_time()
                    data = fetch_bytes(base + item.path, fetch)
                    fetch_times.append(time.thread_time() - t0)
                    found_total += len(decoder.decode(data, item.boxes).crops)
            spent = runs.cpu_s[-1] - sum(fetch_times[fetched:])
            calls.append(spent * 1000 / len(work.run_items))
    finally:
        decoder.close()
    result = _result(
        work.name + ("+process+glibc-defaults" if env else "+process"),
        work.description
        + ", in a decoder process"
        + (" with " + ", ".join(f"{k}={v}" for k, v in env.items()) if env else ""),
        runs,
        found_total,
        _median_ms(fetch_times),
    )
    result.decoder_call_ms = statistics.median(calls)
    return result, start_s


# ---- report ---------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(cpu: int, server_cpus: list[int]) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpus": len(os.sched_getaffinity(0)),
        "measured_cpu": cpu,
        "server_cpus": server_cpus,
        "python": sys.version.split()[0],
        "pillow": PIL.__version__,
        "libjpeg_turbo": bool(features.check_feature("libjpeg_turbo")),
        "opencv": cv2.__version__,
        "platform": platform.platform(),
    }


def render(results: Sequence[Result], env: dict[str, Any], notes: Sequence[str]) -> str:
    server = (
        f"the image server on CPU(s) {','.join(map(str, env['server_cpus']))}"
        if env["server_cpus"]
        else "the image server on the same CPU (only one available: its work is counted)"
    )
    lines = [
        f"### Fetch, decode and crop on one core: {env['cpu_model']}",
        "",
        f"- {env['date']}; {env['cpus']} CPUs, measured on CPU {env['measured_cpu']}, {server}",
        f"- Python {env['python']}, Pillow {env['pillow']} (libjpeg-turbo "
        f"{'yes' if env['libjpeg_turbo'] else 'no'}), OpenCV {env['opencv']}",
        "- HTTP/1.1 keep-alive on 127.0.0.1 through consumer.fetch.http. All times are CPU "
        "time (this process's threads, plus the decoder process in +process rows), so they "
        "are what an unshared core does: img/s/core is the median over "
        f"{results[0].repeats} runs of images per CPU-second, stage columns are per-image "
        "medians",
        f"- the measured core spent {min(r.cpu_share for r in results):.0%}-"
        f"{max(r.cpu_share for r in results):.0%} of the wall time on the bench (the rest: "
        "waiting for the server, and other tenants of the core); wall-clock images/s is in "
        "the JSON",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    for r in results:
        cells = [
            r.row,
            r.description,
            f"{r.faces_per_image:.2f}",
            _fmt(r.images_per_s),
            _fmt(r.fetch_ms),
            _fmt(r.decode_ms),
            _fmt(r.detect_ms),
            _fmt(r.crop_ms),
            _fmt(r.decoder_call_ms),
            _fmt(r.ipc_ms),
            *(_fmt(r.cores(rate)) for _, rate in ENGINE_RATES),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"- {note}" for note in notes)
    for r in results:
        lines.extend(f"- {r.row}: {note}" for note in r.notes)
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--images",
        type=int,
        default=5,
        help=f"frames per run for the frame rows ({FER_PER_IMAGE}x as many FER images)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row (median)")
    parser.add_argument(
        "--warm-up",
        type=int,
        default=1,
        help="untimed images per row first (a whole pass in decoder-process rows)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=FER_FACES,
        help="FER-2013 train folder (class subfolders of PNGs)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "bench")
    args = parser.parse_args(argv)
    if args.images < 1 or args.repeats < 1 or args.warm_up < 0:
        parser.error("--images and --repeats must be at least 1, --warm-up at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workloads = build_workloads(args.images, args.data, args.seed)
    cpus = sorted(os.sched_getaffinity(0))
    cpu, server_cpus = cpus[0], cpus[1:]
    files = {item.path: item.data for work in workloads for item in work.items}
    fetch = FetchSettings(allow_hosts=("127.0.0.1",))
    results: list[Result] = []
    notes: list[str] = []
    warm = max(0, min(args.warm_up, args.images))
    with image_server(files, server_cpus) as base, one_core(cpu):
        try:
            for work in workloads:
                inline = measure_inline(work, base, fetch, args.repeats, warm)
                results.append(inline)
                print(f"{inline.row}: {inline.images_per_s:.1f} images/s", file=sys.stderr)
                if work.faces.detector != "none":
                    continue  # the pipe costs what it costs for 1080p-boxes, the same bytes
                process, start_s = measure_process(work, base, fetch, args.repeats, warm)
                process.ipc_ms = 1000 / process.images_per_s - 1000 / inline.images_per_s
                results.append(process)
                print(f"{process.row}: {process.images_per_s:.1f} images/s", file=sys.stderr)
                if work.name == "1080p-boxes":
                    tuned, _ = measure_process(
                        work, base, fetch, args.repeats, warm, GLIBC_DEFAULT_ENV
                    )
                    tuned.ipc_ms = 1000 / tuned.images_per_s - 1000 / inline.images_per_s
                    results.append(tuned)
                    print(f"{tuned.row}: {tuned.images_per_s:.1f} images/s", file=sys.stderr)
                    notes.append(
                        f"{tuned.row}: as {process.row}, but with glibc's default malloc "
                        "thresholds, which mmap/munmap each frame's 6 MB buffers and fault "
                        "them in again for every frame; the pool's own thresholds avoid that, "
                        "so the IPC ms of the +process row is the pipe round trip"
                    )
                if work.name == "fer48-png":
                    per_image = start_s * 1000 / DecodeSettings().max_tasks_per_process
                    notes.append(
                        f"a decoder process takes {start_s:.2f} CPU-s to start (both sides); "
                        f"retired every decode.max_tasks_per_process="
                        f"{DecodeSettings().max_tasks_per_process} images, that is "
                        f"{per_image:.2f} ms per image more (not in the +process rows)"
                    )
        finally:
            close_idle_connections()
    notes.insert(
        0,
        "cores @R faces/s = R / faces per image / (images/s on one core): the CPU cores that "
        "keep one engine at R faces/s fed (68: the bf16 target on an H100-class GPU, 100: "
        "fp8); IPC ms = per-image CPU time of a +process row minus that of its in-process row",
    )
    env = environment(cpu, server_cpus)
    table = render(results, env, notes)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "prepare-bench-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    (args.out / f"{stem}.md").write_text(table, encoding="utf-8")
    payload = {
        "environment": env,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "engine_rates": dict(ENGINE_RATES),
        "rows": [
            {
                **asdict(r),
                "cores": {name: r.cores(rate) for name, rate in ENGINE_RATES},
            }
            for r in results
        ],
        "notes": notes,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"written {args.out / stem}.md and .json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
