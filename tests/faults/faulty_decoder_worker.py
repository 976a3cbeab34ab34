"""`emotion-worker` whose decoder processes can be made to crash, hang or exit.

No image reliably crashes Pillow, so the worker runs through this wrapper: everything is
the production code, except that its decoder processes run tests.support.faulty_decoder,
which segfaults on a payload of b"CRASH", never answers b"HANG" and exits on b"EXIT"
before handing anything else to the real decoder loop.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from consumer.cli import main
from consumer.config import DecodeSettings, FaceSettings
from consumer.decode.pool import Decoder, ProcessDecoder
from consumer.stream import worker


def _faulty_decoder(
    settings: DecodeSettings,
    faces: FaceSettings,
    max_pixels: int,
    max_bytes: int,
    on_failure: Callable[[str], None] | None = None,
) -> Decoder:
    return ProcessDecoder(
        settings,
        faces,
        max_pixels,
        max_bytes,
        module="tests.support.faulty_decoder",
        on_failure=on_failure,
    )


worker.make_decoder = _faulty_decoder

if __name__ == "__main__":
    sys.exit(main())
