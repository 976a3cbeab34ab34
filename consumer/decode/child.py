"""A decoder process: reads frames on stdin, answers crops on stdout, one at a time.

Started by consumer.decode.pool as ``python -m consumer.decode.child '<settings json>'``.
Its address space is capped (decode.max_memory_mb), so an image that gets past the pixel
check but still allocates without bound fails here, as a MemoryError, and not in the
worker. A crash (a decoder bug hit by a hostile file) ends only this process.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from typing import IO, Any

from consumer.config import FaceSettings
from consumer.decode.decoding import (
    PREFIX_SIZE,
    FrameCropper,
    boxes_from_json,
    encode_cropped,
    encode_error,
    parse_prefix,
    write_frame,
)
from consumer.errors import EventError


def _read_exact(stream: IO[bytes], size: int) -> bytes | None:
    data = stream.read(size)
    if not data:
        return None
    if len(data) != size:
        raise EOFError("the worker closed the pipe mid-frame")
    return data


def serve(config: dict[str, Any], stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """Answer frames until stdin closes."""
    cropper = FrameCropper(FaceSettings(**config["faces"]), int(config["max_pixels"]))
    max_input = int(config["max_bytes"])
    while True:
        prefix = _read_exact(stdin, PREFIX_SIZE)
        if prefix is None:
            return
        head_len, payload_len = parse_prefix(prefix, max_input)
        header = json.loads(_read_exact(stdin, head_len) or b"{}")
        data = _read_exact(stdin, payload_len) if payload_len else b""
        try:
            cropped = cropper(data or b"", boxes_from_json(header.get("boxes")))
            reply, payload = encode_cropped(cropped)
        except EventError as exc:
            reply, payload = encode_error(exc), b""
        except MemoryError:
            reply = encode_error(
                EventError(
                    "image_too_large",
                    "decoding needed more than decode.max_memory_mb of memory",
                )
            )
            payload = b""
        except Exception as exc:  # anything a hostile file provokes is that file's problem
            reply = encode_error(
                EventError("image_undecodable", f"decoder error: {type(exc).__name__}: {exc}")
            )
            payload = b""
        write_frame(stdout, reply, payload)


def main(stdin: IO[bytes] | None = None) -> None:
    """Run with the settings JSON in argv[1]; `stdin` replaces the real one (tests)."""
    # Ctrl-C reaches the whole process group: the worker drains and then closes this
    # process's stdin, so SIGINT here would only abort a decode and print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = json.loads(sys.argv[1])
    limit = int(config["max_memory_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # The real stdout is the reply channel: nothing else may write to it.
    reply = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    serve(config, stdin or sys.stdin.buffer, reply)


if __name__ == "__main__":
    main()
