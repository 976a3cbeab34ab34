"""Output headers: results carry content-type and the W3C trace context, nothing else;
dead letters keep the input record's headers as they were."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from consumer.stream.memory_broker import MemoryBroker
from consumer.stream.records import FailedEvent, InputRecord, PreparedEvent
from consumer.stream.stages import (
    MAX_TRACE_HEADER_BYTES,
    encode_dead_letter,
    encode_result,
    passed_headers,
)
from schemas import DeadLetter, FrameEvent
from tests.support.events import event_bytes
from tests.unit.test_worker_in_memory import (
    DEAD,
    FACES,
    INPUT,
    OUTPUT,
    Running,
    _all_committed,
    _topics,
    _until,
    worker_settings,
)

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
JSON = ("content-type", b"application/json")
# Headers that must not leak from the frames topic to the outputs.
OTHERS = [("authorization", b"Bearer upstream-secret"), ("x-route", b"tenant-7")]


def record(headers: list[tuple[str, bytes | None]], value: bytes = b"{}") -> InputRecord:
    return InputRecord("frames", 0, 5, b"cam", value, tuple(headers))


def test_trace_headers_pass_and_others_do_not() -> None:
    headers = [*OTHERS, ("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)]
    assert passed_headers(record(headers)) == [
        ("traceparent", TRACEPARENT),
        ("tracestate", TRACESTATE),
    ]
    assert passed_headers(record(OTHERS)) == []


def test_trace_headers_are_bounded_not_validated() -> None:
    at_cap, over = b"x" * MAX_TRACE_HEADER_BYTES, b"x" * (MAX_TRACE_HEADER_BYTES + 1)
    # Content is the tracer's business: any bytes up to the cap pass as they are.
    assert passed_headers(record([("traceparent", at_cap), ("tracestate", b"\xff\x00")])) == [
        ("traceparent", at_cap),
        ("tracestate", b"\xff\x00"),
    ]
    with capture_logs() as logs:
        kept = passed_headers(record([("traceparent", over), ("tracestate", TRACESTATE)]))
    assert kept == [("tracestate", TRACESTATE)]
    assert [(e["log_level"], e["header"], e["bytes"]) for e in logs] == [
        ("debug", "traceparent", MAX_TRACE_HEADER_BYTES + 1)
    ]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        # Only the first of repeated headers: an output never has two trace parents.
        ([("traceparent", b"a"), ("traceparent", b"b")], [("traceparent", b"a")]),
        ([("traceparent", None), ("traceparent", b"b")], [("traceparent", b"b")]),  # null
        ([("TraceParent", b"a"), ("trace-parent", b"b")], []),  # Kafka keys are exact
    ],
)
def test_repeated_null_and_misspelt_trace_headers(
    headers: list[tuple[str, bytes | None]], expected: list[tuple[str, bytes]]
) -> None:
    assert passed_headers(record(headers)) == expected


def test_dead_letter_headers() -> None:
    headers = [("traceparent", TRACEPARENT), *OTHERS]
    failed = FailedEvent(record(headers, b"junk"), "not_json", "event is not UTF-8 JSON")
    outcome = encode_dead_letter(failed, "frames.dlq")
    # A dead letter is the input record as it was: every original header, in order (the
    # trace context included), then the worker's own; no content-type, the value is the
    # input's bytes, whatever they are.
    assert outcome.headers[: len(headers)] == headers
    assert all(name.startswith("emotion.") for name, _ in outcome.headers[len(headers) :])
    letter = DeadLetter.from_record(outcome.key, outcome.value, outcome.headers)
    assert letter.headers == headers and letter.error_kind == "not_json"


def test_result_headers() -> None:
    _key, value = event_bytes(FACES[0])
    event = FrameEvent.model_validate_json(value)
    prepared = PreparedEvent(record([*OTHERS, ("tracestate", TRACESTATE)]), event, [], [])
    outcome = encode_result(prepared, [], "stub", "emotions")
    assert outcome.headers == [
        ("event_id", event.event_id.encode()),
        JSON,
        ("tracestate", TRACESTATE),
    ]


def test_the_worker_passes_trace_context_to_results_and_dead_letters() -> None:
    broker = MemoryBroker()
    _topics(broker, 1)
    key, good = event_bytes(FACES[0])
    traced = [*OTHERS, ("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)]
    broker.produce(INPUT, good, key=key, partition=0, headers=traced)
    broker.produce(INPUT, good, key=key, partition=0)  # no headers at all
    broker.produce(INPUT, b"{not json", key=key, partition=0, headers=traced)
    running = Running(broker, worker_settings())
    _until(lambda: _all_committed(broker), what="all offsets committed")
    assert running.stop() == 0
    event_id = FrameEvent.model_validate_json(good).event_id.encode()
    results = [m.headers() for m in broker.records(OUTPUT)]
    assert sorted(results, key=len) == [
        [("event_id", event_id), JSON],
        [("event_id", event_id), JSON, ("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)],
    ]
    (letter,) = broker.records(DEAD)
    original = [h for h in letter.headers() if not h[0].startswith("emotion.")]
    assert original == traced
    assert DeadLetter.from_record(letter.key(), letter.value(), letter.headers()).headers == traced
