"""Which dead letters a replay picks: kinds, --since, earlier replays, omitted payloads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from consumer.config import ConfigError
from consumer.replay.legacy import from_envelope
from consumer.replay.selection import Selection, parse_kinds, parse_since
from consumer.stream.records import FailedEvent, InputRecord
from consumer.stream.stages import encode_dead_letter
from schemas import TRANSIENT_KINDS, DeadLetter, ErrorKind

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def letter(kind: ErrorKind, offset: int = 5, payload: bool = True) -> DeadLetter:
    record = InputRecord("frames", 0, offset, b"cam", b"{}")
    out = encode_dead_letter(FailedEvent(record, kind, "why", 1), "dead", payload)
    return DeadLetter.from_record(out.key, out.value, out.headers)


def test_default_kinds_are_the_transient_ones() -> None:
    assert parse_kinds(None) == TRANSIENT_KINDS == parse_kinds([])
    assert set(TRANSIENT_KINDS) == {"image_fetch_failed", "image_not_found", "model_error"}


def test_kinds_repeated_or_comma_separated() -> None:
    assert parse_kinds(["not_json,invalid_event", "not_json"]) == ("not_json", "invalid_event")


def test_an_unknown_kind_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="--kind colour is not an error kind; use one of not_j"):
        parse_kinds(["colour"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90m", NOW - timedelta(minutes=90)),
        ("6h", NOW - timedelta(hours=6)),
        ("2d", NOW - timedelta(days=2)),
        ("45s", NOW - timedelta(seconds=45)),
        ("2026-12-01T08:00:00Z", datetime(2026, 12, 1, 8, tzinfo=UTC)),
        ("2026-12-01T09:00:00+01:00", datetime(2026, 12, 1, 8, tzinfo=UTC)),
    ],
)
def test_since_takes_a_time_with_a_zone_or_an_age(text: str, expected: datetime) -> None:
    assert parse_since(text, NOW) == expected


@pytest.mark.parametrize("text", ["2026-12-01T08:00:00", "yesterday", "5 h", "-3h"])
def test_since_refuses_what_it_cannot_place(text: str) -> None:
    with pytest.raises(ConfigError, match=r"--since .* give one of those"):
        parse_since(text, NOW)


def test_verdicts() -> None:
    chosen = Selection(("image_fetch_failed",), None, {"image_fetch_failed": {0: 5}})
    assert chosen.verdict(None, 0, 9) == "unreadable"
    assert chosen.verdict(letter("invalid_event"), 0, 9) == "not_chosen"
    assert chosen.verdict(letter("image_fetch_failed"), 0, 4) == "replayed_before"
    assert chosen.verdict(letter("image_fetch_failed"), 0, 5) == "replayed"
    assert chosen.verdict(letter("image_fetch_failed"), 1, 0) == "replayed"  # its own partition
    assert chosen.verdict(letter("image_fetch_failed", payload=False), 0, 5) == "no_payload"
    later = Selection(("image_fetch_failed",), datetime.now(UTC) + timedelta(hours=1), {})
    assert later.verdict(letter("image_fetch_failed"), 0, 0) == "before_since"


def test_reading_starts_at_the_least_progress_of_the_chosen_kinds() -> None:
    progress = {"image_fetch_failed": {0: 40, 1: 7}, "model_error": {0: 12}}
    both = Selection(("image_fetch_failed", "model_error"), None, progress)
    assert (both.start(0, 0), both.start(1, 0), both.start(1, 3)) == (12, 0, 3)
    one = Selection(("image_fetch_failed",), None, progress)
    assert (one.start(0, 0), one.start(1, 0), one.start(0, 50)) == (40, 7, 50)


# A dead letter as 0.3.0 wrote it (its DeadLetter model's model_dump_json()).
LETTER_V1 = (
    b'{"schema_version":1,"source":{"topic":"frames","partition":1,"offset":42},'
    b'"event_id":"evt-9","key":"Y2FtLTE=","value":"eyJpbWFnZSI6ICJodHRwczovL2ltZy85LnBuZyJ9_w==",'
    b'"headers":[{"key":"traceparent","value":"MDAtYWItY2QtMDE="},{"key":"bin","value":"-_8="},'
    b'{"key":"nul","value":null}],"error_kind":"image_fetch_failed","error_message":"HTTP 503",'
    b'"attempts":3,"failed_at":"2026-11-30T10:00:00Z","worker_id":"pod-1:7"}'
)


def test_letters_of_0_3_are_read_for_replay() -> None:
    letter = from_envelope(LETTER_V1)
    assert letter is not None
    assert (letter.key, letter.value) == (b"cam-1", b'{"image": "https://img/9.png"}\xff')
    assert letter.headers == [("traceparent", b"00-ab-cd-01"), ("bin", b"\xfb\xff"), ("nul", None)]
    assert (letter.error_kind, letter.attempts, letter.event_id) == (
        "image_fetch_failed",
        3,
        "evt-9",
    )
    assert letter.source.offset == 42 and letter.payload == "kept"
    assert from_envelope(b"{not json") is None
    assert from_envelope(b'{"schema_version": 2}') is None
