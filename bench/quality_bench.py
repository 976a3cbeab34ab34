"""Face quality (consumer.decode.quality): its cost per face, and the calibration of its flags.

    python -m bench.quality_bench              # median us per face at a few crop sizes
    python -m bench.quality_bench --calibrate  # the measures' distribution on real faces

The calibration runs on the committed FER faces (data/faces, or FER2013_TRAIN) as they are
and on altered copies of each: Gaussian-blurred, darkened, brightened until skin clips, and
shrunk to 20 px. It prints percentiles of every measure and the share of each set that
each flag marks, which is what the thresholds in consumer/decode/quality.py were chosen
from (numbers in bench/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from bench._frames import FER_FACES
from consumer.decode.quality import measure
from schemas import FaceQuality

PERCENTILES = (1, 2, 5, 10, 50, 90, 95, 99)
# Crop sizes for the cost: FER's own, a small camera face, a big one, a close-up.
SIZES = (48, 120, 300, 800)
ALTERED: dict[str, Callable[[Image.Image], Image.Image]] = {
    "as committed": lambda im: im,
    "blur sigma 1": lambda im: im.filter(ImageFilter.GaussianBlur(1)),
    "blur sigma 1.5": lambda im: im.filter(ImageFilter.GaussianBlur(1.5)),
    "blur sigma 2": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "grey levels x0.3": lambda im: im.point(lambda v: v * 0.3),
    "grey levels +120": lambda im: im.point(lambda v: min(255, v + 120)),
    "grey levels x2": lambda im: im.point(lambda v: min(255, v * 2)),
    "shrunk to 20 px": lambda im: im.resize((20, 20), Image.Resampling.BILINEAR),
    "enlarged to 160 px": lambda im: im.resize((160, 160), Image.Resampling.BICUBIC),
}


def face_images(root: Path = FER_FACES) -> list[Image.Image]:
    paths = sorted(root.rglob("*.png")) + sorted(root.rglob("*.jpg"))
    return [Image.open(p).convert("RGB") for p in paths]


def cost_us(sizes: Sequence[int], faces: list[Image.Image], rounds: int) -> dict[int, float]:
    """Median microseconds of one measure() call per crop size (faces resized to it)."""
    out = {}
    for side in sizes:
        crops = [f.resize((side, side), Image.Resampling.BICUBIC) for f in faces[:50]]
        times = []
        for _ in range(rounds):
            for crop in crops:
                started = time.perf_counter()
                measure(crop, "event")
                times.append(time.perf_counter() - started)
        out[side] = statistics.median(times) * 1e6
    return out


def _percentiles(values: list[float]) -> str:
    cells = np.percentile(np.asarray(values), PERCENTILES)
    return " ".join(f"p{q}={v:.3g}" for q, v in zip(PERCENTILES, cells, strict=True))


def calibrate(faces: list[Image.Image]) -> list[str]:
    lines = [f"{len(faces)} faces from {FER_FACES}"]
    for name, alter in ALTERED.items():
        measured: list[FaceQuality] = [measure(alter(face), "none") for face in faces]
        lines.append(f"## {name}")
        for field in ("sharpness", "brightness", "contrast", "score"):
            lines.append(f"  {field:<10} {_percentiles([getattr(q, field) for q in measured])}")
        shares = {
            flag: sum(flag in q.flags for q in measured) / len(measured)
            for flag in ("small", "blurry", "dark", "overexposed")
        }
        lines.append("  flagged    " + " ".join(f"{k}={v:.1%}" for k, v in shares.items()))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate", action="store_true", help="print the calibration")
    parser.add_argument("--rounds", type=int, default=20, help="timing rounds over 50 faces")
    args = parser.parse_args(argv)
    faces = face_images()
    if not faces:
        print(f"no faces under {FER_FACES}", file=sys.stderr)
        return 1
    if args.calibrate:
        print("\n".join(calibrate(faces)))
        return 0
    print("| crop | median us per face |\n|---|---|")
    for side, us in cost_us(SIZES, faces, args.rounds).items():
        print(f"| {side}x{side} | {us:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
