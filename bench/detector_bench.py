"""Face detector accuracy and speed on one CPU core: `python -m bench.detector_bench`.

Frames with known faces (bench/_frames.py: FER-2013 and LFW crops pasted onto busy
backgrounds, backgrounds alone, and scikit-image's astronaut photo with a hand-labelled box)
go through `consumer.decode.detect.HaarDetector` with each cascade asked for. Printed: one summary
row per cascade, then one row per cascade and kind of frame, as markdown; --out also writes
them as .md and .json.

A face counts as found when a detection overlaps its true box with IoU >= 0.5 (one
detection per face, greedily by IoU); every detection left over is a false positive.
Speed is measured on one pinned core with OpenCV single-threaded, as the worker's decoder
processes run it; torch is never imported.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import PIL
from PIL import Image

from bench._frames import (
    FER_FACES,
    Frame,
    astronaut,
    blank_frames,
    compose_frames,
    fer_faces,
    lfw_faces,
)
from consumer.config import FaceSettings, FetchSettings
from consumer.decode.detect import HAAR_CASCADE, HaarDetector
from consumer.decode.images import decode_image
from schemas import FaceBox

# Cascades by short name. The three Haar ones ship in the opencv-python-headless wheel;
# "lbp" is OpenCV's LBP frontal-face cascade as scikit-image ships it (the OpenCV wheel has
# no LBP cascades), a comparison only: skimage is a test dependency, not the worker's.
CASCADES: dict[str, str] = {
    "default": "haarcascade_frontalface_default.xml",
    "alt": "haarcascade_frontalface_alt.xml",
    "alt2": "haarcascade_frontalface_alt2.xml",
    "lbp": "lbpcascade_frontalface_opencv.xml",
}
_T = TypeVar("_T")
MATCH_IOU = 0.5
MAX_PIXELS = FetchSettings().max_pixels
LOOSE_IOU = 0.3
JPEG_QUALITY = 90

COLUMNS = (
    "cascade",
    "kind",
    "frames",
    "faces",
    "recall",
    "recall@0.3",
    "mean IoU",
    "FP/frame",
    "det CPU ms/frame",
    "det frames/s",
    "decode+det frames/s",
)


def iou(a: FaceBox, b: FaceBox) -> float:
    """Intersection over union of two boxes."""
    width = min(a.x + a.width, b.x + b.width) - max(a.x, b.x)
    height = min(a.y + a.height, b.y + b.height) - max(a.y, b.y)
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / (a.width * a.height + b.width * b.height - inter)


def match(
    truth: Sequence[FaceBox], found: Sequence[FaceBox], threshold: float
) -> list[tuple[int, int, float]]:
    """One-to-one (truth index, detection index, IoU) pairs, best IoU first, >= threshold."""
    pairs = sorted(
        (
            (iou(t, f), ti, fi)
            for ti, t in enumerate(truth)
            for fi, f in enumerate(found)
            if iou(t, f) >= threshold
        ),
        reverse=True,
    )
    used_t: set[int] = set()
    used_f: set[int] = set()
    matched = []
    for overlap, ti, fi in pairs:
        if ti not in used_t and fi not in used_f:
            used_t.add(ti)
            used_f.add(fi)
            matched.append((ti, fi, overlap))
    return matched


@dataclass
class Tally:
    """Accuracy and timing of one cascade on one kind of frame."""

    cascade: str
    kind: str
    frames: int = 0
    faces: int = 0
    matched: int = 0
    matched_loose: int = 0
    iou_sum: float = 0.0
    false_positives: int = 0
    # Per frame, median of the repeats: CPU seconds of this thread (detect, decode) and
    # wall-clock seconds (detect).
    detect_s: list[float] = field(default_factory=list)
    detect_wall_s: list[float] = field(default_factory=list)
    decode_s: list[float] = field(default_factory=list)

    def add(self, frame: Frame, found: list[FaceBox], times: tuple[float, float, float]) -> None:
        """Score one frame's detections; `times` is (detect CPU, detect wall, decode CPU) s."""
        strict = match(frame.faces, found, MATCH_IOU)
        self.frames += 1
        self.faces += len(frame.faces)
        self.matched += len(strict)
        self.matched_loose += len(match(frame.faces, found, LOOSE_IOU))
        self.iou_sum += sum(overlap for _, _, overlap in strict)
        self.false_positives += len(found) - len(strict)
        self.detect_s.append(times[0])
        self.detect_wall_s.append(times[1])
        self.decode_s.append(times[2])

    def merge(self, other: Tally) -> None:
        """Add another tally's counts and times into this one."""
        self.frames += other.frames
        self.faces += other.faces
        self.matched += other.matched
        self.matched_loose += other.matched_loose
        self.iou_sum += other.iou_sum
        self.false_positives += other.false_positives
        self.detect_s += other.detect_s
        self.detect_wall_s += other.detect_wall_s
        self.decode_s += other.decode_s

    def row(self) -> dict[str, Any]:
        """The numbers of this tally (None where there is nothing to divide by)."""
        detect = statistics.fmean(self.detect_s) if self.detect_s else None
        wall = statistics.fmean(self.detect_wall_s) if self.detect_wall_s else None
        decode = statistics.fmean(self.decode_s) if self.decode_s else None
        return {
            "cascade": self.cascade,
            "kind": self.kind,
            "frames": self.frames,
            "faces": self.faces,
            "matched": self.matched,
            "recall": self.matched / self.faces if self.faces else None,
            "recall_loose": self.matched_loose / self.faces if self.faces else None,
            "mean_iou": self.iou_sum / self.matched if self.matched else None,
            "false_positives": self.false_positives,
            "fp_per_frame": self.false_positives / self.frames if self.frames else None,
            "detect_ms_per_frame": detect * 1000 if detect is not None else None,
            "detect_wall_ms_per_frame": wall * 1000 if wall is not None else None,
            "decode_ms_per_frame": decode * 1000 if decode is not None else None,
            "detect_frames_per_s": 1 / detect if detect else None,
            "decode_detect_frames_per_s": (
                1 / (detect + decode) if detect is not None and decode is not None else None
            ),
        }


def _cells(row: dict[str, Any]) -> list[str]:
    def num(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    return [
        row["cascade"],
        row["kind"],
        str(row["frames"]),
        str(row["faces"]),
        num(row["recall"], ".2f"),
        num(row["recall_loose"], ".2f"),
        num(row["mean_iou"], ".2f"),
        num(row["fp_per_frame"], ".2f"),
        num(row["detect_ms_per_frame"], ".1f"),
        num(row["detect_frames_per_s"], ".1f"),
        num(row["decode_detect_frames_per_s"], ".1f"),
    ]


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as a markdown table with COLUMNS."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def frame_sets(count: int, seed: int, data: Path) -> dict[str, list[Frame]]:
    """The kinds of frame, by the name their rows carry; `count` FER frames set the size."""
    fer = compose_frames(fer_faces(4 * count, seed, data), count, seed, name="fer")
    people = lfw_faces(faces=True)
    lfw = compose_frames(
        people[seed % len(people) :] + people[: seed % len(people)],
        max(1, count // 2),
        seed + 1,
        name="lfw",
        face_px=(64, 160),
        distractors=lfw_faces(faces=False),
        distractors_per_frame=(0, 2),
    )
    return {
        "fer 640x480": [f for f in fer if f.image.size == (640, 480)],
        "fer 1280x720": [f for f in fer if f.image.size == (1280, 720)],
        "lfw (+non-face patches)": lfw,
        "backgrounds only": blank_frames(max(1, count // 3), seed + 2),
        "astronaut photo": [astronaut()],
    }


def _timed(action: Callable[[], _T]) -> tuple[_T, float, float]:
    """The result, the CPU seconds of this thread and the wall-clock seconds of one call.

    CPU time is what one core of the worker's own would spend: with OpenCV single-threaded
    the whole detection runs on the calling thread, and the time this process waits while
    others (on a shared machine) have the core is left out.
    """
    cpu, wall = time.thread_time(), time.perf_counter()
    result = action()
    return result, time.thread_time() - cpu, time.perf_counter() - wall


def run_cascades(
    detectors: dict[str, HaarDetector],
    sets: dict[str, list[Frame]],
    encoded: dict[str, list[bytes]],
    repeats: int,
) -> dict[str, list[Tally]]:
    """Per cascade, one tally per kind of frame; the first of the timed calls is scored.

    The cascades take turns on every frame, so a change in the machine's load between
    frames hits all of them alike.
    """
    for detector in detectors.values():
        # OpenCV sets up buffers on the first call; keep that out of the first frame's time.
        detector.detect(Image.new("RGB", (320, 240), (128, 128, 128)))
    tallies: dict[str, list[Tally]] = {name: [] for name in detectors}
    for kind, frames in sets.items():
        current = {name: Tally(name, kind) for name in detectors}
        for frame, data in zip(frames, encoded[kind], strict=True):
            decode = [_timed(partial(decode_image, data, MAX_PIXELS))[1] for _ in range(repeats)]
            found: dict[str, list[FaceBox]] = {}
            cpu: dict[str, list[float]] = {name: [] for name in detectors}
            wall: dict[str, list[float]] = {name: [] for name in detectors}
            for _ in range(repeats):
                for name, detector in detectors.items():
                    boxes, cpu_s, wall_s = _timed(partial(detector.detect, frame.image))
                    found.setdefault(name, boxes)
                    cpu[name].append(cpu_s)
                    wall[name].append(wall_s)
            for name, tally in current.items():
                times = (
                    statistics.median(cpu[name]),
                    statistics.median(wall[name]),
                    statistics.median(decode),
                )
                tally.add(frame, found[name], times)
        for name, tally in current.items():
            tallies[name].append(tally)
    return tallies


@contextmanager
def one_core(core: int | None) -> Iterator[str]:
    """Pin this thread to one CPU (the first allowed, or `core`) while the bench runs."""
    if (core is not None and core < 0) or not hasattr(os, "sched_setaffinity"):
        yield "not pinned"
        return
    before = os.sched_getaffinity(0)
    chosen = min(before) if core is None else core
    os.sched_setaffinity(0, {chosen})
    try:
        yield f"pinned to CPU {chosen}"
    finally:
        os.sched_setaffinity(0, before)


@contextmanager
def cascade_files(names: Sequence[str]) -> Iterator[dict[str, Path]]:
    """Paths of the named cascades; "lbp" is a corrected copy in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name in names:
            if name == "lbp":
                from skimage import data

                shipped = Path(data.__file__).parent / CASCADES["lbp"]
                # skimage's copy misspells one tag ("featuhreParams"), which its own reader
                # ignores but OpenCV 4 refuses; the cascade itself is intact.
                text = shipped.read_text(encoding="utf-8").replace("featuhre", "feature")
                paths[name] = Path(tmp) / CASCADES["lbp"]
                paths[name].write_text(text, encoding="utf-8")
            else:
                paths[name] = Path(CASCADES[name])
        yield paths


def environment(pinning: str) -> dict[str, Any]:
    """Versions and machine, for the JSON and the line above the table."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "cpu": cpu,
        "cpus_online": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "pinning": pinning,
        "opencv_threads": cv2.getNumThreads(),
        "torch_imported": "torch" in sys.modules,
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add = parser.add_argument
    add("--frames", type=int, default=8, help="FER frames (LFW: half, backgrounds: a third)")
    add("--seed", type=int, default=0)
    add("--out", type=Path, default=None, help="also write .md and .json to this folder")
    add("--cascades", default="default,alt2", help=f"comma-separated: {','.join(CASCADES)}")
    add("--repeats", type=int, default=3, help="timed runs per frame (median)")
    add("--data", type=Path, default=FER_FACES, help="FER-2013 train folder")
    add("--core", type=int, default=None, help="CPU to pin to (default first; -1: none)")
    defaults = FaceSettings()
    add("--min-neighbors", type=int, default=defaults.haar_min_neighbors)
    add("--scale-factor", type=float, default=defaults.haar_scale_factor)
    add("--detect-max-side", type=int, default=defaults.detect_max_side)
    add("--min-face-px", type=int, default=defaults.min_face_px)
    args = parser.parse_args(argv)
    args.cascades = [c.strip() for c in args.cascades.split(",") if c.strip()]
    unknown = [c for c in args.cascades if c not in CASCADES]
    if unknown or not args.cascades:
        parser.error(f"--cascades: unknown {unknown}; choose from {','.join(CASCADES)}")
    if args.frames < 1 or args.repeats < 1:
        parser.error("--frames and --repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; print the tables and write them under --out if given."""
    args = parse_args(argv)
    settings = FaceSettings(
        detector="haar",
        haar_min_neighbors=args.min_neighbors,
        haar_scale_factor=args.scale_factor,
        detect_max_side=args.detect_max_side,
        min_face_px=args.min_face_px,
    )
    started = time.perf_counter()
    sets = frame_sets(args.frames, args.seed, args.data)
    encoded = {kind: [_jpeg(f.image) for f in frames] for kind, frames in sets.items()}
    compose_s = time.perf_counter() - started
    detail: list[Tally] = []
    summary: list[Tally] = []
    with one_core(args.core) as pinning, cascade_files(args.cascades) as paths:
        detectors = {name: HaarDetector(settings, paths[name]) for name in args.cascades}
        for name, tallies in run_cascades(detectors, sets, encoded, args.repeats).items():
            total = Tally(name, "all")
            for tally in tallies:
                total.merge(tally)
            detail += tallies
            summary.append(total)
        info = environment(pinning)
    shown_default = next((k for k, v in CASCADES.items() if v == HAAR_CASCADE), HAAR_CASCADE)
    notes = [
        f"OpenCV {info['opencv']} on {info['cpu']}, {pinning}, {info['opencv_threads']} "
        f"OpenCV thread(s), load average {_load(info)} at the end; worker default cascade: "
        f"{shown_default}",
        f"settings: scaleFactor {settings.haar_scale_factor}, minNeighbors "
        f"{settings.haar_min_neighbors}, detect_max_side {settings.detect_max_side}, "
        f"min_face_px {settings.min_face_px}; seed {args.seed}, {args.repeats} timed runs per "
        f"frame (median), frames composed in {compose_s:.1f} s",
        f"recall: share of true faces matched by a detection with IoU >= {MATCH_IOU}; "
        f"recall@{LOOSE_IOU} the same at IoU >= {LOOSE_IOU} (FER crops are tight, a cascade's "
        "box is looser); FP: detections matching no face at IoU >= 0.5",
        "times are CPU seconds of the bench's thread (time.thread_time), median of the runs "
        f"per frame, averaged over frames; wall-clock took {_wall_ratio(summary)} of that "
        "(the rest is waiting for the core; per row in the JSON)",
        "decode+det: the frame as JPEG (quality 90) decoded by "
        "consumer.decode.images.decode_image, then detected (sum of the two medians)",
    ]
    if info["torch_imported"]:
        notes.append("torch was already imported in this process (not by this bench)")
    rows = [t.row() for t in summary]
    detail_rows = [t.row() for t in detail]
    text = "\n".join(
        [
            "# Face detector benchmark",
            "",
            *(f"- {note}" for note in notes),
            "",
            "## Per cascade, all frames",
            "",
            markdown_table(rows),
            "",
            "## Per cascade and kind of frame",
            "",
            markdown_table(detail_rows),
            "",
        ]
    )
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = "detector-bench-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        (args.out / f"{stem}.md").write_text(text, encoding="utf-8")
        payload = {
            "environment": info,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "notes": notes,
            "summary": rows,
            "rows": detail_rows,
        }
        (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return 0


def _wall_ratio(tallies: Sequence[Tally]) -> str:
    cpu = sum(sum(t.detect_s) for t in tallies)
    wall = sum(sum(t.detect_wall_s) for t in tallies)
    return f"{wall / cpu:.2f}x" if cpu > 0 else "n/a"


def _load(info: dict[str, Any]) -> str:
    load = info["load_average"]
    return "n/a" if load is None else f"{load[0]:.2f}"


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())
