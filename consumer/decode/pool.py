"""A bounded pool of decoder processes, so a hostile image costs one event, not the worker.

Each decoder process (consumer.decode.child) handles one image at a time. A fetch thread
checks a process out, sends the image, and waits for the crops with a deadline. If the
process dies (a decoder crash) or overruns decode.timeout_s (a decoder stuck in a loop),
it is killed and replaced, and only that event becomes a dead letter: the attribution is
exact because a process never holds two events. Fetch threads beyond decode.workers wait
for a free process, which is what bounds decoding's CPU and memory.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from consumer.config import DecodeSettings, FaceSettings
from consumer.decode.decoding import (
    PREFIX_SIZE,
    Cropped,
    FrameCropper,
    boxes_to_json,
    decode_cropped,
    parse_prefix,
    write_frame,
)
from consumer.errors import EventError
from schemas import FaceBox

log = structlog.get_logger("consumer.decode.pool")

# How long a new decoder process may take to import its libraries and answer.
_START_TIMEOUT_S = 60.0
# The reply's JSON header and framing, beyond the crops' pixels.
_REPLY_SLACK = 1 << 20


class DecoderUnavailableError(RuntimeError):
    """No decoder process can run: a problem of the worker, not of any one event."""


class Decoder(Protocol):
    """What prepare_event needs: bytes and optional boxes in, crops out, EventError else."""

    def decode(self, data: bytes, boxes: list[FaceBox] | None) -> Cropped: ...

    def close(self) -> None: ...


class InlineDecoder:
    """decode.isolation = "thread": the fetch threads decode themselves (no isolation)."""

    def __init__(self, faces: FaceSettings, max_pixels: int) -> None:
        self._faces = faces
        self._max_pixels = max_pixels
        # OpenCV's cascade classifier is not documented as thread-safe: one per thread.
        self._local = threading.local()

    def decode(self, data: bytes, boxes: list[FaceBox] | None) -> Cropped:
        cropper: FrameCropper | None = getattr(self._local, "cropper", None)
        if cropper is None:
            cropper = self._local.cropper = FrameCropper(self._faces, self._max_pixels)
        try:
            return cropper(data, boxes)
        except EventError:
            raise
        except MemoryError as exc:
            raise EventError("image_too_large", "decoding ran out of memory") from exc
        except Exception as exc:
            raise EventError(
                "image_undecodable", f"decoder error: {type(exc).__name__}: {exc}"
            ) from exc

    def close(self) -> None:
        pass


class _Process:
    """One decoder process and its pipes."""

    def __init__(self, config: dict[str, Any], module: str) -> None:
        env = dict(os.environ)
        # One image per process at a time: library thread pools would only oversubscribe.
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        # glibc would return each frame's buffers to the kernel and fault them in again for
        # the next one: ~10 ms of a 1080p frame (bench/prepare_bench.py). Keeping freed
        # memory is bounded anyway by decode.max_memory_mb.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 << 20))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(256 << 20))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self.tasks = 0

    def call(
        self, data: bytes, boxes: list[FaceBox] | None, timeout_s: float, max_bytes: int
    ) -> tuple[dict[str, Any], bytes]:
        """Send one image, wait for the reply; TimeoutError or EOFError when it fails."""
        assert self.proc.stdin is not None
        self.tasks += 1
        deadline = time.monotonic() + timeout_s
        write_frame(self.proc.stdin, {"boxes": boxes_to_json(boxes)}, data)
        prefix = self._read(PREFIX_SIZE, deadline)
        head_len, payload_len = parse_prefix(prefix, max_bytes)
        header = json.loads(self._read(head_len, deadline))
        return header, self._read(payload_len, deadline)

    def _read(self, size: int, deadline: float) -> bytes:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        chunks, left = [], size
        while left:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def stop(self, *, kill: bool = False) -> int | None:
        """End the process; its exit status (negative: the signal that ended it)."""
        if not kill and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()  # EOF: the child returns from its loop
                return self.proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.proc.kill()
        try:
            return self.proc.wait(timeout=5)
        finally:
            for stream in (self.proc.stdin, self.proc.stdout):
                if stream is not None and not stream.closed:
                    with contextlib.suppress(OSError):
                        stream.close()


class ProcessDecoder:
    """decode.isolation = "process": a fixed number of decoder processes, one image each."""

    def __init__(
        self,
        settings: DecodeSettings,
        faces: FaceSettings,
        max_pixels: int,
        max_bytes: int,
        *,
        module: str = "consumer.decode.child",
        on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        # Told "crash" or "timeout" each time a process is lost (the worker's metrics).
        self._on_failure = on_failure or (lambda cause: None)
        # The program each process runs; tests substitute one that can be made to crash.
        self._module = module
        self._config = {
            "faces": faces.model_dump(),
            "max_pixels": max_pixels,
            "max_bytes": max_bytes,
            "max_memory_mb": settings.max_memory_mb,
        }
        self._max_bytes = max_bytes
        # A longer reply than the crop budget allows means a confused decoder process.
        self._max_reply = faces.max_crop_pixels * 3 + _REPLY_SLACK
        # Idle processes; None is a slot whose process must be (re)started before use.
        self._idle: queue.Queue[_Process | None] = queue.Queue()
        self._closed = False
        self.crashes = 0
        self.timeouts = 0
        for _ in range(settings.workers):
            self._idle.put(self._start())

    def _start(self) -> _Process:
        """A new decoder process that has answered one trivial frame (so it works)."""
        process = _Process(self._config, self._module)
        try:
            process.call(b"", None, _START_TIMEOUT_S, self._max_reply)
        except (TimeoutError, EOFError, ValueError, OSError) as exc:
            status = process.stop(kill=True)
            raise DecoderUnavailableError(
                f"a decoder process did not start ({type(exc).__name__}, exit status "
                f"{status}); its error output is above"
            ) from exc
        process.tasks = 0  # the start-up check is not an image
        return process

    def decode(self, data: bytes, boxes: list[FaceBox] | None) -> Cropped:
        if self._closed:
            raise DecoderUnavailableError("the decode pool is closed")
        process = self._idle.get()
        if process is None:  # a slot whose process died and is not restarted yet
            try:
                process = self._start()
            except DecoderUnavailableError:
                self._idle.put(None)
                raise
        keep = False
        try:
            header, payload = process.call(data, boxes, self.settings.timeout_s, self._max_reply)
            keep = process.tasks < self.settings.max_tasks_per_process
        except TimeoutError:
            self.timeouts += 1
            self._on_failure("timeout")
            process.stop(kill=True)
            raise EventError(
                "image_undecodable",
                f"decoding took over decode.timeout_s={self.settings.timeout_s}s; the "
                "decoder process was stopped",
            ) from None
        except (EOFError, ValueError, OSError) as exc:
            self.crashes += 1
            self._on_failure("crash")
            status = process.stop(kill=True)
            log.warning("decoder process crashed", status=_describe(status))
            raise EventError(
                "image_undecodable",
                f"the decoder process crashed on this image ({_describe(status)})",
            ) from exc
        finally:
            if keep and not self._closed:
                self._idle.put(process)
            elif keep:
                process.stop()
            else:
                if process.proc.poll() is None:
                    process.stop()  # retired after max_tasks_per_process
                # Restarted by the next decode() that takes the slot, in that thread.
                self._idle.put(None)
        if not header.get("ok"):
            raise EventError(header["kind"], str(header["message"]))
        return decode_cropped(header, payload)

    def pids(self) -> list[int]:
        """Process ids of the idle decoder processes (for monitoring and benchmarks)."""
        with self._idle.mutex:
            return [p.proc.pid for p in self._idle.queue if p is not None]

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                process = self._idle.get_nowait()
            except queue.Empty:
                return
            if process is not None:
                process.stop()


def _describe(status: int | None) -> str:
    if status is None:
        return "it did not exit"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def make_decoder(
    settings: DecodeSettings,
    faces: FaceSettings,
    max_pixels: int,
    max_bytes: int,
    on_failure: Callable[[str], None] | None = None,
) -> Decoder:
    if settings.isolation == "thread":
        return InlineDecoder(faces, max_pixels)
    return ProcessDecoder(settings, faces, max_pixels, max_bytes, on_failure=on_failure)
