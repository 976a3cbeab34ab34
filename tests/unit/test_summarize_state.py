"""The summarizer's changelog: encoding, restoring, and that a restore mid-stream changes
nothing (the property its exactly-once rests on); reading result records; settings."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.cli import build_parser
from consumer.config import ConfigError, load_settings
from consumer.summarize.command import summarize_overrides
from consumer.summarize.results import NotAResultError, facts_of, read_result
from consumer.summarize.state import (
    POSITION_KEY,
    Restorer,
    StateError,
    changelog_records,
    decode_window,
    encode_position,
    encode_window,
    stream_key,
    window_key,
)
from consumer.summarize.topics import topic_names
from consumer.summarize.windows import Closed, PartitionWindows, Window, WindowRules
from schemas import EmotionResult
from tests.support.results import classified, record, result, skipped

RULES = WindowRules(length_ms=2_000, grace_ms=1_000, max_skew_ms=300_000)
LABELS = ["happy", "sad", "neutral", "angry"]
CLOSED_AT = datetime(2026, 3, 1, 13, 0, tzinfo=UTC)


def _clock() -> float:
    return 0.0


def _stream_of_results(seed: int, count: int) -> list[EmotionResult]:
    """Results of three streams, roughly in time order, with late ones and duplicates."""
    rng = random.Random(seed)
    out: list[EmotionResult] = []
    for i in range(count):
        stream = f"cam-{rng.randrange(3)}"
        at = i * 0.3 - rng.choice([0, 0, 0, 0.5, 1.5, 4.0])  # some late, some beyond grace
        faces = [
            classified(rng.choice(LABELS), rng.uniform(0.3, 0.99))
            if rng.random() < 0.8
            else skipped()
            for _ in range(rng.randrange(3))
        ]
        out.append(result(stream, max(at, 0), i, faces))
        if rng.random() < 0.15:
            out.append(out[rng.randrange(len(out))])  # a redelivery, maybe much later
    return out


def _summaries(closed: list[Closed]) -> list[str]:
    return [c.window.summary(c.stream_id, CLOSED_AT).model_dump_json() for c in closed]


def _log(windows: PartitionWindows, log: dict[bytes, bytes | None]) -> None:
    """Append what changed to a compacted log (the latest value per key)."""
    for key, value in changelog_records(windows.take_changes()):
        log[key] = value


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), cut=st.integers(0, 120), count=st.integers(60, 120))
def test_a_restore_mid_stream_gives_the_same_summaries(seed: int, cut: int, count: int) -> None:
    results = _stream_of_results(seed, count)
    cut = min(cut, len(results))
    straight = PartitionWindows(RULES, _clock)
    through: list[Closed] = []
    outcomes = []
    for res in results:
        outcome, closed = straight.add(facts_of(res))
        outcomes.append(outcome)
        through += closed

    before = PartitionWindows(RULES, _clock)
    published: list[Closed] = []
    log: dict[bytes, bytes | None] = {}
    for i, res in enumerate(results[:cut]):
        published += before.add(facts_of(res))[1]
        if i % 7 == 0:  # a transaction now and then
            _log(before, log)
    _log(before, log)
    log[POSITION_KEY] = encode_position(cut)
    after = PartitionWindows(RULES, _clock)
    restorer = Restorer(after)
    for key, value in log.items():
        restorer.apply(key, value)
    assert restorer.position == cut
    for res in results[cut:]:
        published += after.add(facts_of(res))[1]
    assert _summaries(published) == _summaries(through)
    assert {s: (v.watermark_ms, v.closed_until_ms) for s, v in after.streams.items()} == {
        s: (v.watermark_ms, v.closed_until_ms) for s, v in straight.streams.items()
    }
    assert "duplicate" in outcomes or "late" in outcomes or count < 80


def test_window_encoding_reads_back_bit_for_bit() -> None:
    window = Window(
        start_ms=1_772_366_400_000,
        length_ms=10_000,
        result_ids={"b", "a"},
        faces=3,
        classified=2,
        skipped=1,
        top_labels={"happy": 2},
        score_sums={"happy": 0.1 + 0.2, "sad": 1 / 3},
        confidence_sum=0.7000000000000001,
    )
    value = encode_window(window)
    assert json.loads(value)["ids"] == ["a", "b"]  # sorted: the same state, the same bytes
    assert decode_window(window.start_ms, value) == window


def test_keys_values_tombstones_and_the_position() -> None:
    windows = PartitionWindows(RULES, _clock)
    windows.add(facts_of(result("cam", 0.5, 0, [classified("happy")])))
    windows.add(facts_of(result("cam", 3.5, 1, [classified("sad")])))  # closes [0, 2)
    records = dict(changelog_records(windows.take_changes()))
    start = windows.streams["cam"].closed_until_ms
    assert start is not None
    assert records[window_key("cam", start - 2000)] is None  # closed
    assert records[window_key("cam", start)] is not None  # open: [2, 4)
    assert json.loads(records[stream_key("cam")] or b"") == {
        "v": 1,
        "watermark_ms": windows.streams["cam"].watermark_ms,
        "closed_until_ms": start,
    }
    assert json.loads(window_key("cam", start)) == ["window", "cam", start]


def test_restore_applies_records_in_order_last_wins() -> None:
    source = PartitionWindows(RULES, _clock)
    source.add(facts_of(result("cam", 0.5, 0, [classified("happy")])))
    first = changelog_records(source.take_changes())
    source.add(facts_of(result("cam", 0.6, 1, [classified("happy")])))
    second = changelog_records(source.take_changes())
    target = PartitionWindows(RULES, _clock)
    restorer = Restorer(target)
    for key, value in [*first, *second, (POSITION_KEY, encode_position(7))]:
        restorer.apply(key, value)
    (start,) = target.streams["cam"].open
    assert len(target.streams["cam"].open[start].result_ids) == 2
    assert restorer.position == 7 and restorer.records == len(first) + len(second) + 1
    restorer.apply(window_key("cam", start), None)
    assert target.streams["cam"].open == {}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b'["window", "cam", 0]', b'{"v": 2}'),
        (b'["unknown"]', b'{"v": 1}'),
        (b"not json", b"{}"),
        (POSITION_KEY, b"[1]"),
    ],
)
def test_state_this_version_cannot_read_is_an_error(key: bytes, value: bytes) -> None:
    with pytest.raises(StateError):
        Restorer(PartitionWindows(RULES, _clock)).apply(key, value)


def test_result_records_of_schema_2_and_1_are_read() -> None:
    res = result("cam", 1, 0, [classified("happy", 0.8), skipped()])
    facts = read_result(record(res)[1])
    assert facts.result_id == res.result_id and facts.stream_id == "cam"
    assert [f.label for f in facts.faces] == ["happy", None]
    v1 = json.loads(record(res)[1])
    v1["schema_version"] = 1
    v1["faces"] = [
        {"box": f["box"], "label": f["label"], "confidence": f["confidence"], "scores": f["scores"]}
        for f in v1["faces"]
        if f["status"] == "classified"
    ]
    v1["status"] = "ok"
    old = read_result(json.dumps(v1).encode())
    assert [f.label for f in old.faces] == ["happy"] and old.captured_ms == facts.captured_ms
    for junk in (b"", b"[]", b"not json", b'{"schema_version": 2}', b'{"schema_version": 3}'):
        with pytest.raises(NotAResultError):
            read_result(junk)


def test_settings_defaults_and_topic_names(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EMOTION_WORKER_KAFKA__OUTPUT_TOPIC", "EMOTION_WORKER_SUMMARIZE__RESULTS_TOPIC"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(None, {"kafka": {"output_topic": "faces-out"}})
    names = topic_names(settings)
    assert (names.results, names.summaries, names.state) == (
        "faces-out",
        "emotions.summaries",
        "emotions.summaries.state",
    )
    assert settings.summarize.group_id == "emotion-summarizer"
    assert (settings.summarize.window_s, settings.summarize.grace_s) == (10.0, 5.0)
    with pytest.raises(ConfigError, match=r"summarize\.state_topic"):
        load_settings(None, {"summarize": {"state_topic": "emotions.summaries"}})


def test_flags_override_the_summarize_section() -> None:
    args = build_parser().parse_args(
        ["summarize", "--window-s", "2", "--group-id", "g", "--results-topic", "r"]
    )
    assert summarize_overrides(args) == {
        "summarize": {"group_id": "g", "results_topic": "r", "window_s": 2.0}
    }


def test_windows_of_another_length_close_at_restore_and_nothing_counts_twice() -> None:
    """summarize.window_s changed between two runs: the restored windows are published as
    they are (their own length), and their results are never counted again."""
    old = PartitionWindows(RULES, _clock)
    first = result("cam", 0.5, 0, [classified("happy")])
    old.add(facts_of(first))
    old.add(facts_of(result("cam", 2.5, 1, [classified("sad")])))
    longer = PartitionWindows(WindowRules(5_000, 1_000, 300_000), _clock)
    restorer = Restorer(longer)
    for key, value in changelog_records(old.take_changes()):
        restorer.apply(key, value)
    closed = longer.close_resized()
    assert [c.reason for c in closed] == ["resized", "resized"]
    assert [c.window.length_ms for c in closed] == [2_000, 2_000]
    summary = closed[0].window.summary("cam", CLOSED_AT)
    assert (summary.window_end - summary.window_start).total_seconds() == 2
    assert longer.add(facts_of(first)) == ("late", [])  # a redelivery: already counted
    assert longer.add(facts_of(result("cam", 4.5, 2, [])))[0] == "counted"  # after them
