"""Engine throughput per batch size on this machine: `python -m bench.engine_throughput`.

Prints a table of median faces/s and latency per batch over repeated runs on real FER
faces. Uses the tiny checkpoint unless --model-path names another one.
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
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--batch-sizes", default="1,4,16,32")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--data", type=Path, default=FER_FACES)
    args = parser.parse_args()
    model = args.model_path or make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny-llava")
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    faces = [Image.open(p).convert("RGB") for p in image_files(args.data, limit=max(sizes))]
    print(f"model {model}")
    print(f"{'batch':>5} {'median ms/batch':>16} {'faces/s':>9} {'ms/face':>8}")
    for size in sizes:
        engine = EmotionEngine.load(ModelSettings(path=model), max_batch_size=size)
        engine.warm_up()
        batch = faces[:size]
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            engine.classify(batch)
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        print(
            f"{size:>5} {median * 1000:>16.2f} {size / median:>9.0f} {median * 1000 / size:>8.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
