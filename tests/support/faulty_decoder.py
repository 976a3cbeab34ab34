"""The real decoder process, plus faults a test can trigger with a marker payload.

No image reliably crashes or hangs Pillow (such files are bugs that get fixed), so a
crash and a hang are injected here, on purpose, in front of the real decoder loop:
  b"CRASH" -> SIGSEGV (a real segmentation fault, via ctypes)
  b"HANG"  -> never answers
  b"EXIT"  -> exits with status 3
Anything else is decoded by consumer.decode.child unchanged.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from typing import IO

from consumer.decode import child


class _FaultyStdin:
    """Looks at each frame's payload before the real loop does."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def read(self, size: int) -> bytes:
        data = self._stream.read(size)
        if data.startswith(b"CRASH"):
            ctypes.string_at(0)  # reads address 0: SIGSEGV
        if data.startswith(b"HANG"):
            time.sleep(3600)
        if data.startswith(b"EXIT"):
            os._exit(3)
        return data


if __name__ == "__main__":
    child.main(_FaultyStdin(sys.stdin.buffer))  # type: ignore[arg-type]
