"""`emotion-worker summarize` on the real broker: results in, one summary per window out.

Results are built directly (schema 2, no worker needed) and produced keyed by stream, as
the worker does. The summaries are read with read_committed up to the end offsets, so
what is compared is everything the summarizer committed, not what a reader happened to
see in time.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from schemas import EmotionResult, WindowSummary
from tests.support.kafka import TopicReader, produce, read_to_end
from tests.support.results import (
    T0,
    check_summary,
    classified,
    expected_windows,
    record,
    result,
    skipped,
)
from tests.support.summarizer import SummarizerProcess

pytestmark = pytest.mark.kafka

LABELS = ["angry", "happy", "neutral", "sad", "surprised"]


@pytest.fixture
def start_summarizer(
    tmp_path: Path, kafka_bootstrap: str
) -> Iterator[Callable[..., SummarizerProcess]]:
    """start_summarizer(results_topic=..., ...) -> a running summarizer; killed after."""
    started: list[SummarizerProcess] = []

    def start(
        module: str = "consumer.cli", extra_env: dict[str, str] | None = None, **settings: str
    ) -> SummarizerProcess:
        env = {
            "kafka__bootstrap_servers": kafka_bootstrap,
            "health__host": "127.0.0.1",
            "health__port": "0",
            "summarize__commit_interval_s": "0.2",
            **settings,
        }
        log = tmp_path / f"summarizer-{len(started)}.log"
        process = SummarizerProcess(log, env, module, extra_env)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.running():
            process.kill()


def _summaries(bootstrap: str, topic: str) -> list[WindowSummary]:
    return [WindowSummary.model_validate_json(r.value) for r in read_to_end(bootstrap, topic)]


def _wait_for_summaries(
    bootstrap: str, topic: str, count: int, process: SummarizerProcess, timeout_s: float = 90.0
) -> None:
    deadline = time.monotonic() + timeout_s
    with TopicReader(bootstrap, [topic]) as reader:
        while len(reader.records) < count:
            assert process.running(), process.log_text()[-4000:]
            assert time.monotonic() < deadline, (
                f"{len(reader.records)} of {count} summaries:\n{process.log_text()[-4000:]}"
            )
            reader.poll(0.5)


def _read_uncommitted(bootstrap: str, topic: str) -> list[bytes]:
    """Every record written to `topic`, those of aborted transactions too."""
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"uncommitted-{topic}",
            "isolation.level": "read_uncommitted",
            "enable.partition.eof": True,
        }
    )
    partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
    reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    values, at_end = [], set()
    deadline = time.monotonic() + 30
    while len(at_end) < len(partitions) and time.monotonic() < deadline:
        for msg in reader.consume(1000, timeout=0.2):
            if msg.error() is None:
                values.append(msg.value())
            elif msg.error().code() == KafkaError._PARTITION_EOF:
                at_end.add(msg.partition())
    reader.close()
    return values


def _by_window(summaries: list[WindowSummary]) -> dict[tuple[str, object], WindowSummary]:
    keys = Counter((s.stream_id, s.window_start) for s in summaries)
    twice = {k: n for k, n in keys.items() if n > 1}
    assert not twice, f"windows summarized more than once: {twice}"
    return {(s.stream_id, s.window_start): s for s in summaries}


def _metric(text: str, outcome: str) -> float:
    match = re.search(rf'emotion_summarizer_results_total{{outcome="{outcome}"}} (\S+)', text)
    return float(match.group(1)) if match else 0.0


def _topics(topic_factory: Callable[..., str]) -> tuple[str, str, dict[str, str]]:
    results = topic_factory("emotions", 2)
    summaries = f"summaries-{results}"
    settings = {
        "summarize__results_topic": results,
        "summarize__summaries_topic": summaries,
        "summarize__group_id": f"summarizer-{results}",
        "kafka__group_instance_id": f"summarizer-{results}",  # a restart fences its predecessor
    }
    return results, summaries, settings


def test_results_become_one_summary_per_window(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_summarizer: Callable[..., SummarizerProcess],
) -> None:
    results_topic, summaries_topic, settings = _topics(topic_factory)
    inputs: list[EmotionResult] = []
    for k in range(50):  # cam-a: a result every 0.5 s for 25 s, windows 0, 10 and 20
        faces = [classified(LABELS[k % 5], 0.5 + k / 200)] + [skipped()] * (k % 3 == 0)
        inputs.append(result("cam-a", k * 0.5, len(inputs), faces))
    inputs += [
        result("cam-b", 1, len(inputs), [skipped(), skipped()]),
        result("cam-b", 2, len(inputs) + 1, []),
        result("cam-b", 13, len(inputs) + 2, [classified("sad", 0.9)]),
        result("cam-c", 5, len(inputs) + 3, [classified("happy", 0.6)] * 3),
    ]
    partition = {"cam-a": 0, "cam-b": 1, "cam-c": 1}
    produce(
        kafka_bootstrap,
        results_topic,
        [record(r) for r in inputs],
        partition_of=lambda i: partition[inputs[i].stream_id],
    )
    expected = expected_windows(inputs, 10)
    assert len(expected) == 6
    process = start_summarizer(
        **settings, summarize__window_s="10", summarize__grace_s="2", summarize__idle_close_s="2"
    )
    _wait_for_summaries(kafka_bootstrap, summaries_topic, len(expected), process)
    metrics = process.metrics()
    assert process.stop() == 0, process.log_text()[-4000:]

    records = read_to_end(kafka_bootstrap, summaries_topic)
    assert all(
        r.key == WindowSummary.model_validate_json(r.value).stream_id.encode() for r in records
    )
    got = _by_window(_summaries(kafka_bootstrap, summaries_topic))
    assert set(got) == set(expected)
    for key, summary in got.items():
        check_summary(summary, expected[key])
        assert (summary.window_end - summary.window_start).total_seconds() == 10
    assert got[("cam-a", T0)].results == 20 and got[("cam-b", T0)].skipped_share == 1.0
    assert _metric(metrics, "counted") == len(inputs)


def test_late_results_within_grace_count_beyond_grace_are_dropped(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_summarizer: Callable[..., SummarizerProcess],
) -> None:
    results_topic, summaries_topic, settings = _topics(topic_factory)
    face = [classified("neutral", 0.8)]
    r = {t: result("cam", t, i, face) for i, t in enumerate([1, 2, 12, 3, 16, 4, 14, 27, 9])}
    # Window 10 s, grace 5 s. 3 arrives after 12 (window 0 still open: 12 < 10 + 5); 16
    # closes window 0; 4 and 9 arrive after that; 27 closes window 10; idleness closes 20.
    sent = [r[1], r[2], r[1], r[12], r[3], r[16], r[4], r[14], r[27], r[9]]
    produce(kafka_bootstrap, results_topic, [record(x) for x in sent], partition_of=lambda i: 1)
    counted = [r[t] for t in (1, 2, 12, 3, 16, 14, 27)]
    expected = expected_windows(counted, 10)
    assert [e.results for _, e in sorted(expected.items())] == [3, 3, 1]
    process = start_summarizer(
        **settings, summarize__window_s="10", summarize__grace_s="5", summarize__idle_close_s="2"
    )
    _wait_for_summaries(kafka_bootstrap, summaries_topic, 3, process)
    metrics = process.metrics()
    assert process.stop() == 0
    got = _by_window(_summaries(kafka_bootstrap, summaries_topic))
    assert set(got) == set(expected)
    for key, summary in got.items():
        check_summary(summary, expected[key])
    assert (_metric(metrics, "counted"), _metric(metrics, "late")) == (7, 2)
    assert _metric(metrics, "duplicate") == 1


def _with_duplicates(inputs: list[EmotionResult], rng: random.Random) -> list[EmotionResult]:
    """Every result once, in order, and about one in six again: at once or much later (its
    window closed by then), as an at-least-once worker's redeliveries come."""
    sent: list[EmotionResult] = []
    later: dict[int, list[EmotionResult]] = {}
    for i, res in enumerate(inputs):
        sent.append(res)
        sent += later.pop(i, [])
        if rng.random() < 0.08:
            sent.append(res)
        elif rng.random() < 0.08:
            later.setdefault(i + rng.randrange(10, 80), []).append(res)
    return sent + [r for rs in later.values() for r in rs]


def test_sigkill_mid_window_loses_nothing_and_counts_nothing_twice(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_summarizer: Callable[..., SummarizerProcess],
) -> None:
    results_topic, summaries_topic, settings = _topics(topic_factory)
    rng = random.Random(16)
    streams = [f"cam-{i}" for i in range(4)]
    inputs: list[EmotionResult] = []
    for k in range(150):  # 4 results a second of capture time per stream, 2 s windows
        for stream in streams:
            faces = [classified(rng.choice(LABELS), rng.uniform(0.3, 0.95)) for _ in range(2)]
            inputs.append(result(stream, k * 0.25, len(inputs), faces + [skipped()] * (k % 4 == 0)))
    sent = _with_duplicates(inputs, rng)
    assert len(sent) > len(inputs) + 50
    expected = expected_windows(inputs, 2)
    assert len(expected) == 4 * 19

    def feed() -> None:  # the results arrive over about 8 s, while the summarizer dies twice
        for start in range(0, len(sent), 25):
            chunk = sent[start : start + 25]
            produce(
                kafka_bootstrap,
                results_topic,
                [record(x) for x in chunk],
                partition_of=lambda i, chunk=chunk: streams.index(chunk[i].stream_id) % 2,
            )
            time.sleep(0.25)

    feeder = threading.Thread(target=feed, daemon=True)
    window_settings = {
        **settings,
        "summarize__window_s": "2",
        "summarize__grace_s": "1",
        "summarize__idle_close_s": "3",
    }
    first = start_summarizer(**window_settings)
    feeder.start()
    _wait_for_summaries(kafka_bootstrap, summaries_topic, 4, first)
    time.sleep(rng.uniform(0, 0.3))
    first.kill()
    assert len(read_to_end(kafka_bootstrap, summaries_topic)) < len(expected)
    # The second is killed inside a transaction that holds summaries, written to the
    # broker but not committed: the third fences it (same transactional id), which aborts
    # them, and publishes those windows itself, once.
    second = start_summarizer(
        module="tests.support.slow_summarizer",
        extra_env={"SUMMARIZER_COMMIT_DELAY_S": "3"},
        **window_settings,
    )
    second.wait_for_event(
        lambda e: e.get("event") == "transaction open" and int(str(e["summaries"])) > 0,
        "a transaction with summaries",
    )
    second.kill()
    third = start_summarizer(**window_settings)
    feeder.join(60)
    _wait_for_summaries(kafka_bootstrap, summaries_topic, len(expected), third, timeout_s=120)
    time.sleep(2)  # more would show up here (a window summarized twice)
    metrics = third.metrics()
    assert third.stop() == 0, third.log_text()[-4000:]

    got = _by_window(_summaries(kafka_bootstrap, summaries_topic))
    assert set(got) == set(expected)
    for key, summary in got.items():
        check_summary(summary, expected[key])
    # The killed transaction's summaries are in the topic, aborted: more summary records
    # than windows for a reader that reads them anyway.
    assert len(_read_uncommitted(kafka_bootstrap, summaries_topic)) > len(expected)
    # The restarts found open windows in the changelog: they were killed mid-window.
    restored = [
        int(str(e["open_windows"]))
        for p in (second, third)
        for e in p.log_events()
        if e.get("event") == "state restored"
    ]
    assert sum(restored) > 0, restored
    assert _metric(metrics, "duplicate") + _metric(metrics, "late") > 0


def test_partitions_move_between_summarizers_without_loss_or_double_counting(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_summarizer: Callable[..., SummarizerProcess],
) -> None:
    """Scaling out and back in: a second summarizer joins (a partition moves to it, with its
    state), then the first one leaves (the other moves too), while results keep coming."""
    results_topic, summaries_topic, settings = _topics(topic_factory)
    del settings["kafka__group_instance_id"]  # dynamic members: a stopped one leaves at once
    rng = random.Random(7)
    streams = ["cam-0", "cam-1", "cam-2", "cam-3"]
    inputs = [
        result(s, k * 0.25, k * 4 + i, [classified(rng.choice(LABELS), rng.uniform(0.3, 0.9))])
        for k in range(100)
        for i, s in enumerate(streams)
    ]
    sent = _with_duplicates(inputs, rng)
    expected = expected_windows(inputs, 2)
    window_settings = {
        **settings,
        "summarize__window_s": "2",
        "summarize__grace_s": "1",
        "summarize__idle_close_s": "3",
    }

    def feed() -> None:
        for start in range(0, len(sent), 20):
            chunk = sent[start : start + 20]
            produce(
                kafka_bootstrap,
                results_topic,
                [record(x) for x in chunk],
                partition_of=lambda i, chunk=chunk: streams.index(chunk[i].stream_id) % 2,
            )
            time.sleep(0.25)

    feeder = threading.Thread(target=feed, daemon=True)
    first = start_summarizer(**window_settings)
    feeder.start()
    _wait_for_summaries(kafka_bootstrap, summaries_topic, 4, first)
    second = start_summarizer(**window_settings)
    second.wait_for_event(lambda e: e.get("event") == "partitions assigned", "its partition")
    assert first.stop() == 0, first.log_text()[-4000:]  # its partition moves to the second
    feeder.join(60)
    _wait_for_summaries(kafka_bootstrap, summaries_topic, len(expected), second, timeout_s=120)
    time.sleep(2)
    assert second.stop() == 0, second.log_text()[-4000:]
    got = _by_window(_summaries(kafka_bootstrap, summaries_topic))
    assert set(got) == set(expected)
    for key, summary in got.items():
        check_summary(summary, expected[key])
    moved = [e for e in second.log_events() if e.get("event") == "partitions assigned"]
    assert len(moved) == 2, moved  # one partition when it joined, the other when first left
