"""The model over the labelled images: read, decode and classify them in batches, timed.

The images go through exactly what the worker does with a pre-cropped face: the same
decoder (consumer.decode.images.decode_image: format allow-list, EXIF orientation, RGB),
the whole image as the face (faces.detector = "none"), and the same EmotionEngine. So the
accuracy reported is the accuracy the worker would have on these faces, not that of a
separate evaluation path that could drift from it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from consumer.config import WorkerSettings
from consumer.eval.dataset import EvalError, Sample


@dataclass(slots=True)
class Predictions:
    """What the classification loop produced, in sample order (skipped images left out)."""

    relative: list[str]
    truth: list[str]
    predicted: list[str]
    scores: list[list[float]]
    skipped: list[dict[str, str]]
    load_s: float = 0.0
    classify_s: float = 0.0
    loop_s: float = 0.0
    # Seconds of each engine call: the median is a latency, the sum a throughput, and a
    # comparison of two settings needs both.
    batch_s: list[float] = field(default_factory=list)


def classify_samples(
    engine: Any,
    samples: Sequence[Sample],
    batch_size: int,
    settings: WorkerSettings,
    *,
    quiet: bool,
    desc: str = "eval",
) -> Predictions:
    """Read, decode and classify every sample in batches, timing the two parts apart."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    from consumer.decode.images import decode_image
    from consumer.errors import EventError

    labels: tuple[str, ...] = engine.labels
    run = Predictions([], [], [], [], [])
    correct = 0
    loop_start = time.perf_counter()
    with tqdm(total=len(samples), unit="img", desc=desc, disable=quiet, dynamic_ncols=True) as bar:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            t0 = time.perf_counter()
            faces = []
            kept: list[Sample] = []
            for sample in batch:
                try:
                    data = sample.path.read_bytes()
                    faces.append(decode_image(data, settings.fetch.max_pixels))
                    kept.append(sample)
                except (EventError, OSError) as exc:  # the worker would dead-letter it
                    run.skipped.append({"path": sample.relative, "error": str(exc)})
            t1 = time.perf_counter()
            results = engine.classify(faces) if faces else []
            t2 = time.perf_counter()
            run.load_s += t1 - t0
            run.classify_s += t2 - t1
            if faces:
                run.batch_s.append(t2 - t1)
            for sample, result in zip(kept, results, strict=True):
                run.relative.append(sample.relative)
                run.truth.append(sample.label)
                run.predicted.append(result.label)
                run.scores.append([result.scores[label] for label in labels])
                correct += result.label == sample.label
            bar.update(len(batch))
            if run.truth:
                bar.set_postfix(acc=f"{correct / len(run.truth):.3f}", refresh=False)
    run.loop_s = time.perf_counter() - loop_start
    if not run.truth:
        raise EvalError(
            f"none of the {len(samples)} images could be decoded, e.g. "
            f"{run.skipped[0]['path']}: {run.skipped[0]['error']}"
        )
    return run
