"""The whole path, live: frame events in, the page in headless Chromium shows their windows.

Nothing is made up on the way. Frame events of real FER faces, with stream ids and
capture times of the test's choosing (three streams, four 10 s windows a few minutes ago),
go to a fresh input topic in three bursts while the page is open; a worker process (the
tiny checkpoint) turns them into results, `emotion-worker summarize` (a process, windows
closed within seconds) into window summaries, and `start_dashboard` serves the page that
Chromium (tests/support/browser.py) loads before the first event is sent. After each burst
the page must show it, and at the end:

- the summaries topic (read_committed, to its end offsets, after the worker and the
  summarizer stopped) holds each window once, and its windows account for every event
  sent: per window, per stream and in all, `results` and `faces` equal the events sent;
- the page shows every stream, and per window the face count and per-label counts of the
  topic's latest record for it, each of which came to the open page as an event.

So a result lost or counted twice by the worker, the summarizer or the page fails it. The
screenshot goes to the test's folder and to .cache/live-page-end-to-end.png.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from consumer.config import FER_LABELS, load_settings
from consumer.dashboard.app import start_dashboard
from schemas import EmotionResult
from tests.support.browser import MISSING, Browser, chromium_binary
from tests.support.dashboard_page import (
    SHOWN,
    as_on_page,
    assert_table,
    latest_per_window,
    read_summaries,
    wait_for_streams,
    window_start,
)
from tests.support.events import event_bytes
from tests.support.kafka import end_offsets, produce, read_to_end
from tests.support.summarizer import SummarizerProcess
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / ".cache" / "live-page-end-to-end.png"
PARTITIONS = 2
WINDOW_S = 10
# Events per 10 s window, per stream: cam-c starts a window later, while the page is open.
PLAN = {"cam-a": [6, 5, 7, 6], "cam-b": [5, 7, 6, 6], "cam-c": [0, 6, 5, 7]}
# The windows each burst sends, whole: a window's events never straddle a pause, in which
# the summarizer closes the windows of silent streams.
BURSTS = [[0], [1, 2], [3]]

# The faces on the page, in all (a JS expression over SHOWN's value `s`).
PAGE_FACES = "Object.values(s.streams).flatMap(Object.values).reduce((n, w) => n + w.faces, 0)"


def _events(
    faces: list[Path], base: datetime
) -> list[tuple[int, str, datetime, tuple[bytes, bytes]]]:
    """(window, stream, window start, (key, value)) per event, in capture time order."""
    events = []
    images = iter(faces)
    for stream, counts in PLAN.items():
        for window, count in enumerate(counts):
            start = base + timedelta(seconds=WINDOW_S * window)
            for k in range(count):
                captured = start + timedelta(seconds=0.5 + k * (WINDOW_S - 1) / count)
                value = event_bytes(next(images), stream, captured_at=captured.isoformat())
                events.append((window, stream, start, value))
    # Streams interleaved, as cameras send; a stream's events stay in time order.
    return sorted(events, key=lambda e: json.loads(e[3][1])["captured_at"])


@pytest.fixture
def summarizers(tmp_path: Path) -> Iterator[list[SummarizerProcess]]:
    """Summarizer processes the test appends; killed after it if still running."""
    started: list[SummarizerProcess] = []
    yield started
    for process in started:
        if process.running():
            process.kill()


def test_events_flow_to_the_open_page_and_every_one_is_counted(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_worker: Callable[..., WorkerProcess],
    summarizers: list[SummarizerProcess],
    face_paths: list[Path],
    tmp_path: Path,
) -> None:
    if chromium_binary() is None:  # fails, in CI and here: never a skip
        pytest.fail(MISSING, pytrace=False)
    frames = topic_factory("frames", PARTITIONS)
    results_topic = topic_factory("emotions", PARTITIONS)
    dead = topic_factory("dead", 1)
    # Made before the page server starts, as the demo does: it reads it from the start.
    summaries_topic = topic_factory("summaries", PARTITIONS)

    now = datetime.now(UTC).replace(microsecond=0)
    base = now - timedelta(minutes=3, seconds=now.second % WINDOW_S)
    events = _events(face_paths, base)
    sent = Counter((stream, start) for _, stream, start, _ in events)
    assert len(events) == sum(map(sum, PLAN.values())) == 66

    worker = start_worker(
        kafka__input_topic=frames,
        kafka__output_topic=results_topic,
        kafka__dead_letter_topic=dead,
        kafka__group_id=f"group-{frames}",
        fetch__threads="2",
        decode__workers="1",
    )
    summarizer = SummarizerProcess(
        tmp_path / "summarizer.log",
        {
            "kafka__bootstrap_servers": kafka_bootstrap,
            "kafka__group_instance_id": f"summarizer-{frames}",
            "health__host": "127.0.0.1",
            "health__port": "0",
            "summarize__results_topic": results_topic,
            "summarize__summaries_topic": summaries_topic,
            "summarize__group_id": f"summarizer-{frames}",
            "summarize__window_s": str(WINDOW_S),
            "summarize__grace_s": "1",
            # A stream silent this long has its windows closed: the last window of each burst.
            # Longer than any pause of a busy worker within a burst, which would close a
            # window before all its results are in (the rest: late, dropped).
            "summarize__idle_close_s": "5",
            "summarize__commit_interval_s": "0.2",
        },
    )
    summarizers.append(summarizer)
    settings = load_settings(
        None,
        {
            "kafka": {"bootstrap_servers": kafka_bootstrap},
            "summarize": {"summaries_topic": summaries_topic},
            "dashboard": {"port": 0},
        },
    )
    dashboard = start_dashboard(settings)

    def logs() -> str:
        def tail(process: WorkerProcess) -> str:  # the settings line is long and no news
            lines = process.log_text().splitlines()
            return "\n".join(x for x in lines if '"effective config"' not in x)[-3000:]

        return (
            f"\n--- worker\n{tail(worker)}\n--- summarizer\n{tail(summarizer)}\n"
            f"--- dashboard reader: {dashboard.reader.status()}"
        )

    try:
        with Browser(tmp_path) as browser:
            browser.open(dashboard.url)
            empty = browser.wait_for(
                f"(() => {{ const s = {SHOWN}; return s.state === 'live' ? s : null; }})()", 30
            )
            assert empty and empty["streams"] == {}, empty

            sent_so_far = 0
            for burst in BURSTS:
                batch = [e for e in events if e[0] in burst]
                produce(kafka_bootstrap, frames, [value for *_, value in batch])
                sent_so_far += len(batch)
                # The page follows: a face per event, each of these windows closed (the
                # first burst waits for the worker's start-up too).
                shown = browser.wait_for(
                    f"(() => {{ const s = {SHOWN}; "
                    f"return {PAGE_FACES} >= {sent_so_far} ? s : null; }})()",
                    timeout_s=60 if burst is not BURSTS[0] else 120,
                )
                assert shown, (
                    f"after {sent_so_far} events the page shows "
                    f"{json.dumps(browser.evaluate(SHOWN)['streams'], sort_keys=True)}{logs()}"
                )

            # Everything is in: stop both, so the topics hold all they will ever hold.
            assert worker.stop() == 0, logs()
            assert summarizer.stop() == 0, logs()
            _assert_every_event_counted(kafka_bootstrap, results_topic, dead, events, logs)

            summaries = read_summaries(kafka_bootstrap, summaries_topic)
            written = Counter((s.stream_id, window_start(s)) for _, s in summaries)
            assert max(written.values()) == 1, f"windows published twice: {written}"
            latest = latest_per_window(summaries)
            results = {key: s.results for key, s in latest.items()}
            wanted = {
                (stream, start.isoformat().replace("+00:00", "Z")): n
                for (stream, start), n in sent.items()
            }
            # The summaries account for every event: in all, per stream, per window.
            assert sum(results.values()) == len(events), (results, logs())
            for stream, counts in PLAN.items():
                counted = sum(n for (s, _), n in results.items() if s == stream)
                assert counted == sum(counts), (stream, results)
            assert results == wanted, logs()
            # One face each (a FER face is a whole image), classified or skipped.
            for key, summary in latest.items():
                assert summary.faces == summary.classified + summary.skipped == wanted[key], key
                assert sum(label.faces for label in summary.labels.values()) == summary.classified

            expected = as_on_page(latest)
            assert set(expected) == set(PLAN)
            shown = wait_for_streams(browser, expected, timeout_s=30)
            assert shown["state"] == "live"
            assert shown["events"] == len(summaries), "each summary came to the open page"
            assert shown["legend"] == [*FER_LABELS, "skipped"]
            assert_table(shown["rows"], expected)

            screenshot = browser.screenshot(tmp_path / "live-page.png")
    finally:
        dashboard.stop()
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 10_000
    SCREENSHOT.parent.mkdir(exist_ok=True)
    shutil.copy(screenshot, SCREENSHOT)


def _assert_every_event_counted(
    bootstrap: str,
    results_topic: str,
    dead: str,
    events: list[tuple[int, str, datetime, tuple[bytes, bytes]]],
    logs: Callable[[], str],
) -> None:
    """The worker's part: a result for every event, in the stream and window it was sent
    for, and no dead letter (which would point at the worker, not the summarizer)."""
    assert end_offsets(bootstrap, dead, 1) == {0: 0}, logs()
    results = [
        EmotionResult.model_validate_json(r.value) for r in read_to_end(bootstrap, results_topic)
    ]
    by_event = {result.event_id: result for result in results}
    # One each: none missing, none twice (a clean run redelivers nothing).
    assert len(results) == len(by_event) == len(events), (len(by_event), len(results), logs())
    for _, stream, start, (_, value) in events:
        event = json.loads(value)
        result = by_event[event["event_id"]]
        assert result.stream_id == stream and len(result.faces) == 1
        assert start <= result.captured_at < start + timedelta(seconds=WINDOW_S)
