"""Hostile event payloads: parse_event returns an event or raises EventError, nothing else.

The poll loop (consumer.stream.worker.Worker._handle) catches only EventError around
parse_event: any other exception ends the worker, and since the record's offset is never
committed, the restarted worker reads the same record and dies again (a poison pill that
stops the partition for good). So "raises only EventError" is the property that matters.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.decode.pool import ProcessDecoder
from consumer.errors import EventError
from consumer.stream.stages import parse_event
from schemas import FrameEvent
from schemas.events import IMAGE_SCHEMES
from tests.security.conftest import (
    MAX_EVENT_BYTES,
    SETTINGS,
    event_value,
    expect_failed,
    record,
    run_value,
)

PARSE_BOUND_S = 2.0


def parse_kind(value: bytes, max_event_bytes: int = MAX_EVENT_BYTES) -> str:
    """The dead-letter kind parse_event gives `value`, or "ok"; other exceptions propagate."""
    try:
        parse_event(record(value), max_event_bytes)
    except EventError as exc:
        return exc.kind
    return "ok"


def test_an_event_over_max_event_bytes_is_refused_before_parsing(
    decoder: ProcessDecoder,
) -> None:
    # 1 MiB of nesting: parsing it would recurse deep; the size check comes first.
    value = b"[" * (1 << 19) + b"]" * (1 << 19)
    run = run_value(value, SETTINGS, decoder)
    failed = expect_failed(run, "event_too_large", within_s=PARSE_BOUND_S)
    assert f"flow.max_event_bytes={MAX_EVENT_BYTES}" in failed.message


def test_an_event_of_exactly_max_event_bytes_is_parsed() -> None:
    base = event_value("file:///x.png")
    padded = base[:-1] + b" " * (MAX_EVENT_BYTES - len(base)) + b"}"
    assert len(padded) == MAX_EVENT_BYTES
    assert parse_kind(padded) == "ok"
    assert parse_kind(padded + b" ") == "event_too_large"


NESTING_BUG = (
    "consumer/stream/stages.py parse_event: json.loads raises RecursionError on deep nesting (and "
    "ValueError on integer literals over 4300 digits); only UnicodeDecodeError and "
    "JSONDecodeError are caught, so the exception escapes to the poll loop and kills the "
    "worker on every redelivery. Fix: drop the json.loads pre-check and map pydantic's "
    "json_invalid errors to not_json (jiter has its own depth limit), or catch "
    "(RecursionError, ValueError) as not_json."
)


@pytest.mark.parametrize(
    ("value", "max_event_bytes"),
    [
        (b"[" * 100_000 + b"]" * 100_000, 1 << 20),  # the 100000 nested lists
        (b"[" * 20_000 + b"]" * 20_000, MAX_EVENT_BYTES),  # under the default cap
        (b'{"a":' * 5_000 + b"1" + b"}" * 5_000, MAX_EVENT_BYTES),
        (b'{"event_id": ' + b"9" * 5_000 + b"}", MAX_EVENT_BYTES),  # int over 4300 digits
    ],
    ids=["lists-100000", "lists-20000", "objects-5000", "int-5000-digits"],
)
def test_deep_nesting_and_huge_numbers_are_dead_letters(
    value: bytes, max_event_bytes: int, decoder: ProcessDecoder
) -> None:
    run = run_value(value, SETTINGS, decoder, max_event_bytes)
    expect_failed(run, "invalid_event", "not_json", within_s=PARSE_BOUND_S)


def test_nesting_pydantic_alone_would_refuse() -> None:
    """The fix NESTING_BUG suggests is sound: the schema's own parser has a depth limit."""
    with pytest.raises(ValueError, match="recursion limit"):
        FrameEvent.model_validate_json(b"[" * 20_000 + b"]" * 20_000)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\xff\xfe\xfa",
        b'{"event_id": "\xff"}',  # invalid UTF-8 inside a string
        b"\xc0\xaf",  # overlong encoding of "/"
        "{}".encode("latin-1") + "é".encode("latin-1"),
    ],
)
def test_bytes_that_are_not_utf8_json_are_not_json(value: bytes) -> None:
    assert parse_kind(value) == "not_json"


ENCODING_BUG = (
    "consumer/stream/stages.py parse_event: json.loads(bytes) auto-detects UTF-16 and UTF-32 and "
    "decodes with 'surrogatepass', so such values (and UTF-8-encoded surrogates) pass the "
    "not_json check and are dead-lettered as invalid_event ('Invalid JSON: ...') although "
    "they are not UTF-8 JSON. Fix: value.decode('utf-8') (strict) before the JSON check, "
    "or classify pydantic's json_invalid errors as not_json."
)


@pytest.mark.parametrize(
    "value",
    [
        *(event_value("file:///x.png").decode().encode(c) for c in ("utf-16", "utf-16-be")),
        event_value("file:///x.png").decode().encode("utf-32"),
        b'{"event_id": "\xed\xa0\x80"}',  # a UTF-8-encoded surrogate: not valid UTF-8
    ],
    ids=["utf-16", "utf-16-be", "utf-32", "encoded-surrogate"],
)
def test_utf16_utf32_and_surrogates_are_not_json(value: bytes) -> None:
    assert parse_kind(value) == "not_json"


def test_a_utf8_bom_is_refused_either_way() -> None:
    assert parse_kind(b"\xef\xbb\xbf" + event_value("file:///x.png")) in (
        "not_json",
        "invalid_event",
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"null",
        b"[]",
        b'"text"',
        b"1e999999",
        b'{"event_id": NaN, "stream_id": "s", "captured_at": "2026-01-01T00:00:00Z",'
        b' "image": "file:///x"}',
        b'{"event_id": "e", "stream_id": "s", "captured_at": "2026-01-01T00:00:00Z",'
        b' "image": "file:///x", "faces": [{"x": Infinity, "y": 0, "width": 1, "height": 1}]}',
        b'{"event_id": "e", "stream_id": "s", "captured_at": "2026-01-01T00:00:00Z",'
        b' "image": "file:///x", "extra": -Infinity}',
        b'{"event_id": "e", "stream_id": "s", "captured_at": "2026-01-01T00:00:00Z",'
        b' "image": "file:///x", "faces": [{"x": 1.0, "y": 0, "width": 1, "height": 1}]}',
        b'{"event_id": "e\\u0000", "stream_id": "s", "captured_at": "2026-01-01T00:00:00Z",'
        b' "image": "file:///x"}',
        b'{"event_id": "e", "stream_id": "s", "captured_at": "2026-01-01T00:00:00",'
        b' "image": "file:///x"}',  # no time zone
        b'{"event_id": "e", "stream_id": "s", "captured_at": "2026-01-01T00:00:00Z",'
        b' "image": "file:///x", "faces": []}',
        b'{"event_id": "e", "stream_id": "s", "captured_at": "2026-01-01T00:00:00Z",'
        b' "image": "file:///x", "schema_version": 2}',
        b'{"event_id": "e", "stream_id": "s", "captured_at": "2026-01-01T00:00:00Z",'
        b' "image": "data:image/png;base64"}',  # a data URI with no comma
    ],
)
def test_json_that_is_no_frame_event_is_invalid_event(raw: bytes) -> None:
    assert parse_kind(raw) == "invalid_event"


def test_too_many_faces_are_invalid() -> None:
    faces = [{"x": 0, "y": 0, "width": 1, "height": 1}] * 65
    assert parse_kind(event_value("file:///x.png", faces)) == "invalid_event"


EVENT_HEAD = b'{"event_id": "e", "stream_id": "s", "captured_at": "2026-01-01T00:00:00Z", '
BOX = b'{"x": 0, "y": 0, "width": 1, "height": 1}'


def duplicate_message(value: bytes) -> str:
    with pytest.raises(EventError) as info:
        parse_event(record(value), MAX_EVENT_BYTES)
    assert info.value.kind == "invalid_event", info.value.message
    return info.value.message


@pytest.mark.parametrize(
    "first_then_last",
    [
        ("s3://bucket/ok.png", "file:///etc/shadow"),  # both valid: the smuggling case
        ("file:///a.png", "ftp://evil/x"),
        ("ftp://x", "file:///b"),
    ],
)
def test_a_duplicate_key_is_refused_whichever_value_is_valid(
    first_then_last: tuple[str, str],
) -> None:
    """Parsers disagree on which duplicate wins, so an upstream check and the worker could
    see different images: neither is taken."""
    first, last = first_then_last
    value = EVENT_HEAD + f'"image": "{first}", "image": "{last}"}}'.encode()
    # A last value the schema refuses is reported as such (the scan runs after the
    # schema): either way the event is invalid_event and the message names the field.
    message = duplicate_message(value)
    assert "image" in message
    if not last.startswith("ftp:"):
        assert message.startswith('event JSON names the key "image" twice'), message


def test_the_message_names_the_key_and_its_path() -> None:
    top = EVENT_HEAD + b'"image": "s3://bucket/k.png", "stream_id": "t"}'
    assert duplicate_message(top).startswith(
        'event JSON names the key "stream_id" twice (at stream_id)'
    )
    nested = (
        EVENT_HEAD
        + b'"image": "s3://bucket/k.png", "faces": ['
        + BOX
        + b', {"x": 0, "y": 0, "x": 900, "width": 1, "height": 1}]}'
    )
    message = duplicate_message(nested)
    assert message.startswith('event JSON names the key "x" twice (at faces[1].x)'), message


def test_keys_spelt_with_escapes_are_still_duplicates() -> None:
    # "\u0069mage" is "image": a byte-level scan would miss it, a JSON decoder does not.
    value = EVENT_HEAD + b'"image": "s3://bucket/k.png", "\\u0069mage": "file:///etc/shadow"}'
    assert '"image" twice' in duplicate_message(value)


def test_a_duplicate_inside_a_string_is_no_duplicate() -> None:
    quoted = json.dumps('{"image": "a", "image": "b"}')  # JSON text as an id: just characters
    value = (
        b'{"event_id": '
        + quoted.encode()
        + b', "stream_id": "s", "captured_at": "2026-01-01T00:00:00Z", '
        + b'"image": "s3://bucket/k.png", "faces": ['
        + BOX
        + b", "
        + BOX
        + b"]}"
    )
    event = parse_event(record(value), MAX_EVENT_BYTES)
    assert event.event_id == '{"image": "a", "image": "b"}'
    assert len(event.faces or []) == 2  # equal objects side by side are no duplicate either


def test_other_errors_keep_their_kind_and_message_when_keys_repeat() -> None:
    # The schema's verdict comes first; the duplicate scan only sees events it accepted.
    value = EVENT_HEAD + b'"image": "ftp://x", "image": "ftp://y", "colour": 1}'
    with pytest.raises(EventError) as info:
        parse_event(record(value), MAX_EVENT_BYTES)
    assert info.value.kind == "invalid_event" and "colour" in info.value.message
    assert parse_kind(b'{"a": 1, "a": [' + b"[" * 5000 + b"]" * 5000 + b"]}") in (
        "not_json",
        "invalid_event",
    )


def test_a_duplicate_key_becomes_a_dead_letter(decoder: ProcessDecoder) -> None:
    value = EVENT_HEAD + b'"image": "s3://bucket/k.png", "faces": [' + BOX[:-1] + b', "y": 3}]}'
    run = run_value(value, SETTINGS, decoder)
    failed = expect_failed(run, "invalid_event", within_s=PARSE_BOUND_S)
    assert "(at faces[0].y)" in failed.message and failed.event_id is None


@pytest.mark.parametrize(
    "image",
    [
        "ftp://127.0.0.1/x.png",
        "gopher://127.0.0.1:70/_GET",
        "javascript:alert(1)",
        "jar:http://127.0.0.1/x.jar!/a.png",
        "dict://127.0.0.1:11211/stat",
        "ldap://127.0.0.1/",
        "netdoc:///etc/passwd",
        "mailto:a@b.c",
        "view-source:http://127.0.0.1/",
        "//127.0.0.1/x.png",  # scheme-relative
        "/etc/passwd",
        "127.0.0.1/x.png",
        "C:\\images\\x.png",
        "file://evil.example/x.png",  # a file URI with a host
        "file:",
        "http:///x.png",  # no host
        "s3://a/x.png",  # bucket name too short
        "s3://bucket",  # no key
    ],
)
def test_unsupported_or_malformed_image_uris_are_invalid_at_parse(
    image: str, decoder: ProcessDecoder
) -> None:
    run = run_value(event_value(image), SETTINGS, decoder)
    expect_failed(run, "invalid_event", within_s=PARSE_BOUND_S)
    assert run.outcome.record.value == event_value(image)


# ---- fuzz --------------------------------------------------------------------------------

FIELDS = ["event_id", "stream_id", "captured_at", "image", "faces", "schema_version"]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
uris = st.one_of(
    st.sampled_from(
        [
            "file:///x.png",
            "file://localhost/x.png",
            "http://127.0.0.1/x.png",
            "https://images.example/a?b=c",
            "s3://bucket/key.png",
            "data:image/png;base64,AAAA",
            "http://[::1]:80/",
            "http://a@b/",
        ]
    ),
    st.builds(
        lambda scheme, rest: f"{scheme}:{rest}",
        st.sampled_from([*IMAGE_SCHEMES, "ftp", "gopher", "jar", "HTTP", "File", "S3", ""]),
        st.text(max_size=40),
    ),
)
timestamps = st.one_of(
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.sampled_from(["2026-11-28T10:00:00Z", "2026-13-01T00:00:00Z", "1970-01-01T00:00:00+25:00"]),
    st.text(max_size=25),
)
boxes = st.fixed_dictionaries(
    {
        "x": st.integers(-5, 200_000),
        "y": st.integers(-5, 200_000),
        "width": st.integers(-5, 200_000),
        "height": st.integers(-5, 200_000),
    }
)
identifiers = st.text(
    st.characters(min_codepoint=32).filter(lambda ch: ch != "\x7f"), min_size=1, max_size=256
)
valid_uris = st.one_of(
    st.sampled_from(["file:///x.png", "s3://bucket/key.png", "data:image/png;base64,AAAA"]),
    st.builds(
        lambda scheme, host, path: f"{scheme}://{host}/{path}",
        st.sampled_from(["http", "https", "HTTP"]),
        st.sampled_from(["images.example", "127.0.0.1", "[::1]", "a.b:8080", "2130706433"]),
        st.text(max_size=40),
    ),
)
# Per field: a valid value, or a wrong one (any JSON, wrong-typed, out of range).
valid_values: dict[str, st.SearchStrategy[Any]] = {
    "event_id": identifiers,
    "stream_id": identifiers,
    "captured_at": st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    "image": valid_uris,
    "faces": st.lists(
        st.builds(
            dict,
            x=st.integers(0, 100_000),
            y=st.integers(0, 100_000),
            width=st.integers(1, 100_000),
            height=st.integers(1, 100_000),
        ),
        min_size=1,
        max_size=64,
    ),
    "schema_version": st.just(1),
}
wrong_values: dict[str, st.SearchStrategy[Any]] = {
    "event_id": st.text(max_size=300) | json_values,
    "stream_id": st.text(max_size=300) | json_values,
    "captured_at": timestamps | json_values,
    "image": uris | json_values,
    "faces": st.lists(boxes, max_size=66) | json_values,
    "schema_version": st.sampled_from([2, "1", 1.0, None]),
}


@st.composite
def events(draw: st.DrawFn) -> bytes:
    """Events whose fields are each valid (mostly), wrong, missing; sometimes extra ones."""
    event: dict[str, Any] = {}
    for name in FIELDS:
        roll = draw(st.integers(0, 19))
        if roll == 0 or (roll < 5 and name in ("faces", "schema_version")):
            continue  # missing (optional fields: often)
        values = wrong_values if roll in (1, 2) else valid_values
        event[name] = draw(values[name])
    if draw(st.integers(0, 9)) == 0:
        event.update(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=2)))
    text = json.dumps(event, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")


def check_parse(value: bytes) -> None:
    """parse_event raises EventError or gives an event that round-trips and is valid."""
    started = time.monotonic()
    try:
        event = parse_event(record(value), MAX_EVENT_BYTES)
    except EventError as exc:
        assert exc.kind in ("not_json", "invalid_event", "event_too_large")
        assert exc.message
        return
    finally:
        assert time.monotonic() - started < PARSE_BOUND_S
    again = FrameEvent.model_validate_json(event.model_dump_json())
    assert again == event
    assert urlsplit(event.image).scheme in IMAGE_SCHEMES
    assert event.faces is None or 1 <= len(event.faces) <= 64
    assert event.captured_at.utcoffset() is not None
    assert not math.isnan(event.captured_at.timestamp())


@settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.binary(max_size=2048))
def test_fuzz_parse_arbitrary_bytes(value: bytes) -> None:
    check_parse(value)


@settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(events())
def test_fuzz_parse_structured_events(value: bytes) -> None:
    check_parse(value)


@settings(max_examples=100, derandomize=True, deadline=None, database=None)
@given(events(), st.data())
def test_fuzz_parse_mangled_events(value: bytes, data: st.DataObject) -> None:
    """Valid-ish events with bytes cut, inserted or replaced."""
    cut = data.draw(st.integers(0, len(value)))
    insert = data.draw(st.binary(max_size=8))
    keep = data.draw(st.integers(cut, len(value)))
    check_parse(value[:cut] + insert + value[keep:])
