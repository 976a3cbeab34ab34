"""MicroBatcher: batches by face count and waiting time, in arrival order."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

from PIL import Image

from consumer.stream.batching import MicroBatcher
from consumer.stream.records import FailedEvent, InputRecord, PreparedEvent
from schemas import FrameEvent

EVENT = FrameEvent.model_validate_json(
    '{"event_id": "e", "stream_id": "s", "captured_at": "2026-01-01T00:00:00Z",'
    ' "image": "file:///x.png"}'
)


def prepared(offset: int, faces: int = 1) -> PreparedEvent:
    record = InputRecord("t", 0, offset, None, b"")
    crop = Image.new("RGB", (4, 4))
    return PreparedEvent(record, EVENT, [], [crop] * faces)


def done(item: PreparedEvent | FailedEvent) -> Future[PreparedEvent | FailedEvent]:
    future: Future[PreparedEvent | FailedEvent] = Future()
    future.set_result(item)
    return future


def offsets(batch: list[PreparedEvent | FailedEvent]) -> list[int]:
    return [item.record.offset for item in batch]


def test_full_batches_go_at_once_in_order() -> None:
    batcher = MicroBatcher(max_faces=4, max_wait_s=10.0)
    for offset in range(10):
        batcher.put(done(prepared(offset)))
    stop = threading.Event()
    started = time.monotonic()
    assert offsets(batcher.next_batch(stop)) == [0, 1, 2, 3]
    assert offsets(batcher.next_batch(stop)) == [4, 5, 6, 7]
    assert time.monotonic() - started < 5  # did not wait for max_wait when full


def test_partial_batch_goes_after_max_wait() -> None:
    batcher = MicroBatcher(max_faces=16, max_wait_s=0.05)
    batcher.put(done(prepared(0)))
    batcher.put(done(prepared(1)))
    assert offsets(batcher.next_batch(threading.Event())) == [0, 1]


def test_face_count_not_event_count_fills_a_batch() -> None:
    batcher = MicroBatcher(max_faces=4, max_wait_s=10.0)
    batcher.put(done(prepared(0, faces=3)))
    batcher.put(done(prepared(1, faces=2)))  # would make 5: waits for the next batch
    batcher.put(done(prepared(2, faces=9)))  # larger than a batch: goes alone
    stop = threading.Event()
    assert offsets(batcher.next_batch(stop)) == [0]
    assert offsets(batcher.next_batch(stop)) == [1]
    assert offsets(batcher.next_batch(stop)) == [2]


def test_faces_skipped_for_low_quality_take_no_room_in_a_batch() -> None:
    batcher = MicroBatcher(max_faces=4, max_wait_s=10.0)
    skipping = prepared(0, faces=5)
    skipping.skip_reasons = {0: "low", 1: "low", 2: "low"}  # 2 faces left for the model
    batcher.put(done(skipping))
    batcher.put(done(prepared(1, faces=2)))
    batcher.put(done(prepared(2)))
    assert offsets(batcher.next_batch(threading.Event())) == [0, 1]


def test_waits_for_the_head_to_keep_order() -> None:
    batcher = MicroBatcher(max_faces=8, max_wait_s=0.5)
    slow: Future[PreparedEvent | FailedEvent] = Future()
    batcher.put(slow)
    batcher.put(done(prepared(1)))
    threading.Timer(0.1, lambda: slow.set_result(prepared(0))).start()
    assert offsets(batcher.next_batch(threading.Event())) == [0, 1]


def test_failed_events_travel_in_order_without_faces() -> None:
    batcher = MicroBatcher(max_faces=2, max_wait_s=0.01)
    failed = FailedEvent(InputRecord("t", 0, 1, None, b""), "image_not_found", "gone")
    for item in (prepared(0), failed, prepared(2)):
        batcher.put(done(item))
    assert offsets(batcher.next_batch(threading.Event())) == [0, 1, 2]


def test_stop_returns_empty_when_idle() -> None:
    batcher = MicroBatcher(max_faces=2, max_wait_s=0.01)
    stop = threading.Event()
    stop.set()
    assert batcher.next_batch(stop) == []
