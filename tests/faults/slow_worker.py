"""`emotion-worker` whose model step sleeps: a GPU batch slower than max.poll.interval.ms.

A real GPU batch that slow cannot be had on the CPU-only CI machines, so the fault suite
runs the real worker through this wrapper, which only adds a sleep to each classify call
(FAULT_BATCH_DELAY_S seconds) and logs "slow batch" with how long the call took, so the
test can tell that the delay really ran. Everything else is the production code.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import structlog

from consumer.cli import main
from consumer.engine import EmotionEngine

_real_classify = EmotionEngine.classify
_delay_s = float(os.environ.get("FAULT_BATCH_DELAY_S", "0"))
_warming = {"done": False}


def _slow_classify(self: EmotionEngine, faces: Sequence[Any]) -> Any:
    if not _warming["done"]:
        return _real_classify(self, faces)
    started = time.monotonic()
    time.sleep(_delay_s)
    scores = _real_classify(self, faces)
    took_s = round(time.monotonic() - started, 3)
    structlog.get_logger("tests.faults.slow_worker").info(
        "slow batch", faces=len(faces), delay_s=_delay_s, took_s=took_s
    )
    return scores


def _warm_up(self: EmotionEngine) -> None:
    _real_classify(self, [])
    _warming["done"] = True


EmotionEngine.classify = _slow_classify  # type: ignore[method-assign]
EmotionEngine.warm_up = _warm_up  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
