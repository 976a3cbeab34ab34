"""`emotion-worker` whose model step sleeps: a GPU batch slower than max.poll.interval.ms.

A real GPU batch that slow cannot be had on the CPU-only CI machines, so the fault suite
runs the real worker through this wrapper, which only adds a sleep to each classify call
(FAULT_BATCH_DELAY_S seconds). Everything else is the production code.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from consumer.cli import main
from consumer.engine import EmotionEngine

_real_classify = EmotionEngine.classify
_delay_s = float(os.environ.get("FAULT_BATCH_DELAY_S", "0"))
_warming = {"done": False}


def _slow_classify(self: EmotionEngine, faces: Sequence[Any]) -> Any:
    if _warming["done"]:
        time.sleep(_delay_s)
    return _real_classify(self, faces)


def _warm_up(self: EmotionEngine) -> None:
    _real_classify(self, [])
    _warming["done"] = True


EmotionEngine.classify = _slow_classify  # type: ignore[method-assign]
EmotionEngine.warm_up = _warm_up  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())
