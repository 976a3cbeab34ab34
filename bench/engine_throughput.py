"""Engine throughput per batch size on this machine: `python -m bench.engine_throughput`.

Prints a table of median faces/s and latency per batch over repeated runs on real FER
faces. Uses the tiny checkpoint unless --model-path names another one; give --model-path
more than once and/or --tta none,flip to compare settings in one run: the settings take
turns within every repeat (round robin), so a noisy neighbour on a shared machine slows all
of them alike, and the last column is each one's median over the first setting's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from bench._frames import FER_FACES
from consumer.config import ModelSettings
from consumer.engine import EmotionEngine, make_tiny_checkpoint
from consumer.event_source import image_files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, action="append", default=None)
    parser.add_argument("--batch-sizes", default="1,4,16,32")
    parser.add_argument("--tta", default="none", help="comma-separated: none, flip")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--data", type=Path, default=FER_FACES)
    args = parser.parse_args()
    models = args.model_path or [make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny-llava")]
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    modes = [m.strip() for m in args.tta.split(",") if m.strip()]
    faces = [Image.open(p).convert("RGB") for p in image_files(args.data, limit=max(sizes))]
    print(f"{'model':<24} {'tta':<5} {'batch':>5} {'median ms/batch':>16} {'faces/s':>9} "
          f"{'ms/face':>8} {'vs first':>8}")  # fmt: skip
    for size in sizes:
        engines = {
            (model, mode): EmotionEngine.load(
                ModelSettings(path=model, tta=mode),
                max_batch_size=size,
            )
            for model in models
            for mode in modes
        }
        times: dict[tuple[Path, str], list[float]] = {key: [] for key in engines}
        for engine in engines.values():
            engine.warm_up()
        batch = faces[:size]
        for _ in range(args.repeats):
            for key, engine in engines.items():
                started = time.perf_counter()
                engine.classify(batch)
                times[key].append(time.perf_counter() - started)
        first = statistics.median(next(iter(times.values())))
        for (model, mode), samples in times.items():
            median = statistics.median(samples)
            print(
                f"{model.name:<24} {mode:<5} {size:>5} {median * 1000:>16.2f} "
                f"{size / median:>9.0f} {median * 1000 / size:>8.3f} {first / median:>7.2f}x"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
