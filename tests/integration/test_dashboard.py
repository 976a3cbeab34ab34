"""`emotion-worker dashboard` in a real browser, on the real broker, while summaries flow.

Window summaries are made here (tests/support/summaries.py), not by the summarizer, and
published to a summaries topic of their own: some before the page opens (the page must
show the last minutes at once), some while it is open (it must follow them live), one
that replaces a window already shown, one too old for the page's history and one in an
aborted transaction. Headless Chromium (tests/support/browser.py) then must show every
stream, and per window the face counts and label mix that the topic holds for it, read
back read_committed. The screenshot goes to the test's folder and to
.cache/dashboard-screenshot.png.

A page server started before its topic exists waits for it, healthy, and then reads it.

Chromium is required: without it this test fails with what to install (CI installs it in
.ci/run; `make test` says so in one line), it is never skipped.
"""

from __future__ import annotations

import json
import random
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from consumer.config import FER_LABELS, load_settings
from consumer.dashboard.app import Dashboard, start_dashboard
from schemas.summary import WindowSummary
from tests.support.browser import MISSING, Browser, chromium_binary
from tests.support.dashboard_page import SHOWN, assert_table, expected_on_page, wait_for_streams
from tests.support.summaries import random_summary, window_summary

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / ".cache" / "dashboard-screenshot.png"
HISTORY_MINUTES = 10


def publish(
    bootstrap: str, topic: str, summaries: list[WindowSummary], timestamp_ms: int | None = None
) -> None:
    """Publish as the summarizer does: JSON values keyed by stream id."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    extra: dict[str, Any] = {} if timestamp_ms is None else {"timestamp": timestamp_ms}
    for summary in summaries:
        value = summary.model_dump_json().encode()
        producer.produce(topic, key=summary.stream_id.encode(), value=value, **extra)
    assert producer.flush(30) == 0


def publish_aborted(bootstrap: str, topic: str, summary: WindowSummary) -> None:
    """A summary in a transaction that is aborted: read_committed readers never see it."""
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"aborted-{topic}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, key=summary.stream_id.encode(), value=summary.model_dump_json())
    producer.flush(30)
    producer.abort_transaction(30)


@pytest.fixture
def dashboard(kafka_bootstrap: str, topic_factory: Callable[..., str]) -> Iterator[Dashboard]:
    topic = topic_factory("summaries", partitions=2)
    settings = load_settings(
        None,
        {
            "kafka": {"bootstrap_servers": kafka_bootstrap},
            "summarize": {"summaries_topic": topic},
            "dashboard": {"port": 0, "history_minutes": HISTORY_MINUTES},
        },
    )
    # Published before the page server starts: history it must find by time.
    now = datetime.now(UTC).replace(microsecond=0)
    base = now - timedelta(minutes=3, seconds=now.second % 10)
    rng = random.Random(16)
    too_old_ms = int((now - timedelta(minutes=HISTORY_MINUTES + 20)).timestamp() * 1000)
    publish(kafka_bootstrap, topic, [random_summary(rng, "cam-old", base)], too_old_ms)
    publish(
        kafka_bootstrap,
        topic,
        [
            random_summary(rng, s, base + timedelta(seconds=10 * i))
            for s in ("cam-a", "cam-b")
            for i in range(6)
        ],
    )
    publish_aborted(kafka_bootstrap, topic, window_summary("cam-aborted", base, {"angry": 9}))
    running = start_dashboard(settings)
    try:
        yield running
    finally:
        running.stop()


def _api(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "api/summaries", timeout=10) as reply:
        data: dict[str, Any] = json.load(reply)
        return data


def test_the_page_shows_what_the_summaries_topic_holds_while_it_flows(
    dashboard: Dashboard, kafka_bootstrap: str, tmp_path: Path
) -> None:
    if chromium_binary() is None:  # fails, in CI and here: never a skip
        pytest.fail(MISSING, pytrace=False)
    topic = dashboard.reader.topic
    since_ms = int((time.time() - HISTORY_MINUTES * 60) * 1000)
    # The reader has caught up with the history before the page opens.
    deadline = time.monotonic() + 60
    while sum(len(s["windows"]) for s in _api(dashboard.url)["streams"]) < 12:
        assert time.monotonic() < deadline, f"reader never caught up: {dashboard.reader.status()}"
        time.sleep(0.2)

    with Browser(tmp_path) as browser:
        browser.open(dashboard.url)
        first = browser.wait_for(
            f"(() => {{ const s = {SHOWN}; return s.state === 'live' && "
            "Object.keys(s.streams).length === 2 ? s : null; })()",
            timeout_s=30,
        )
        assert first, f"the page never showed the history: {browser.evaluate(SHOWN)}"
        assert first["events"] == 0, "the history came with the snapshot, not as events"

        # While the page is open: new windows, a new stream, a window published again.
        rng = random.Random(17)
        held = _api(dashboard.url)["streams"]
        base = datetime.fromisoformat(held[0]["windows"][0]["window_start"])
        replaced = datetime.fromisoformat(held[1]["windows"][2]["window_start"])
        batches = [
            [random_summary(rng, "cam-a", base + timedelta(seconds=10 * i)) for i in (6, 7)],
            [random_summary(rng, "cam-c", base + timedelta(seconds=10 * i)) for i in range(4)],
            [
                window_summary(
                    "cam-b", replaced, {"surprised": 7}, skipped=2, closed_at=datetime.now(UTC)
                )
            ],
            [random_summary(rng, "cam-a", base + timedelta(seconds=80))],
        ]
        for batch in batches:
            publish(kafka_bootstrap, topic, batch)
            time.sleep(0.3)

        expected, in_topic = expected_on_page(kafka_bootstrap, topic, since_ms)
        # cam-old is in the topic but older than the page's history; cam-aborted was never
        # committed.
        assert in_topic == {"cam-a", "cam-b", "cam-c", "cam-old"}
        assert set(expected) == {"cam-a", "cam-b", "cam-c"}
        assert expected["cam-b"][replaced.isoformat().replace("+00:00", "Z")]["faces"] == 9
        shown = wait_for_streams(browser, expected, timeout_s=30)
        assert shown["events"] == sum(map(len, batches)), "each new summary came as an event"
        assert shown["legend"] == [*FER_LABELS, "skipped"]
        assert_table(shown["rows"], expected)

        screenshot = browser.screenshot(tmp_path / "dashboard.png")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 10_000
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shutil.copy(screenshot, SCREENSHOT)


def test_a_page_started_before_its_topic_exists_waits_for_it(kafka_bootstrap: str) -> None:
    """The summarizer may create the summaries topic after the page server started."""
    from consumer.stream.kafka_io import ensure_topics

    topic = f"summaries-later-{time.time_ns()}"
    settings = load_settings(
        None,
        {
            "kafka": {"bootstrap_servers": kafka_bootstrap},
            "summarize": {"summaries_topic": topic},
            "dashboard": {"port": 0},
        },
    )
    running = start_dashboard(settings)
    try:
        deadline = time.monotonic() + 10
        while True:
            with urllib.request.urlopen(running.url + "healthz", timeout=10) as reply:
                assert reply.status == 200, "waiting is healthy: nothing to restart"
                if f"waiting for topic {topic}" in reply.read().decode():
                    break
            assert time.monotonic() < deadline, running.reader.status()
            time.sleep(0.1)
        ensure_topics(kafka_bootstrap, [topic], partitions=1)
        summary = window_summary("cam-late", datetime.now(UTC), {"neutral": 4})
        publish(kafka_bootstrap, topic, [summary])
        deadline = time.monotonic() + 30
        while not _api(running.url)["streams"]:
            assert time.monotonic() < deadline, running.reader.status()
            time.sleep(0.2)
        (stream,) = _api(running.url)["streams"]
        assert stream["stream_id"] == "cam-late" and stream["windows"][0]["faces"] == 4
    finally:
        running.stop()
