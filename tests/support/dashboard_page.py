"""The dashboard's page as a test sees it: what its DOM shows, and what it must show.

`SHOWN` reads the page (the data attributes dashboard.js writes) in a Browser
(tests/support/browser.py). `expected_on_page` reads the summaries topic read_committed
to its end offsets and says what the page must draw from it: per stream, per window, the
latest record's face count and label mix.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from schemas.summary import WindowSummary
from tests.support.browser import Browser
from tests.support.kafka import Record, TopicReader

# Per stream, per window start (as the JSON of the summary writes it): faces and per-label
# counts, "skipped" for the faces not classified.
PageStreams = dict[str, dict[str, dict[str, Any]]]

# What the page shows, read from its DOM (the data attributes of dashboard.js).
SHOWN = """(() => ({
  state: document.body.dataset.state,
  events: Number(document.body.dataset.events),
  legend: [...document.querySelectorAll('#legend li')].map((li) => li.dataset.label),
  streams: Object.fromEntries([...document.querySelectorAll('article[data-stream]')].map(
    (a) => [a.dataset.stream, Object.fromEntries([...a.querySelectorAll('g[data-window-start]')]
      .map((g) => [g.dataset.windowStart, {
        faces: Number(g.dataset.faces),
        labels: Object.fromEntries([...g.querySelectorAll('rect[data-label]')].map(
          (r) => [r.dataset.label, Number(r.dataset.count)])),
      }]))])),
  rows: [...document.querySelectorAll('#latest tbody tr')].map(
    (tr) => [tr.dataset.stream, tr.dataset.windowStart, Number(tr.dataset.faces)]),
}))()"""


def window_start(summary: WindowSummary) -> str:
    """The window's start as the page names it: as the summary's JSON writes it."""
    return str(summary.model_dump(mode="json")["window_start"])


def read_summaries(bootstrap: str, topic: str) -> list[tuple[Record, WindowSummary]]:
    """Every committed summary of `topic` up to its end offsets of now, with its record."""
    with TopicReader(bootstrap, [topic]) as reader:
        records = reader.catch_up()
    return [(r, WindowSummary.model_validate_json(r.value)) for r in records]


def latest_per_window(
    summaries: list[tuple[Record, WindowSummary]], since_ms: int = 0
) -> dict[tuple[str, str], WindowSummary]:
    """Per (stream, window start): the record the page keeps, of those written from
    `since_ms` on (a later one replaces a window unless it was closed earlier)."""
    latest: dict[tuple[str, str], WindowSummary] = {}
    for record, summary in summaries:
        if record.timestamp_ms < since_ms:
            continue
        key = (summary.stream_id, window_start(summary))
        held = latest.get(key)
        if held is None or held.closed_at <= summary.closed_at:
            latest[key] = summary
    return latest


def as_on_page(latest: dict[tuple[str, str], WindowSummary]) -> PageStreams:
    """What the page draws for these windows: faces, and the labels with faces (skipped
    faces as "skipped")."""
    shown: PageStreams = {}
    for (stream, start), summary in latest.items():
        labels = {k: v.faces for k, v in summary.labels.items() if v.faces}
        if summary.faces > summary.classified:
            labels["skipped"] = summary.faces - summary.classified
        shown.setdefault(stream, {})[start] = {"faces": summary.faces, "labels": labels}
    return shown


def expected_on_page(bootstrap: str, topic: str, since_ms: int) -> tuple[PageStreams, set[str]]:
    """Per stream, per window start: what the topic holds (read_committed) from `since_ms`,
    a window's latest record winning, as the page must draw it; and every stream in it."""
    summaries = read_summaries(bootstrap, topic)
    return as_on_page(latest_per_window(summaries, since_ms)), {s.stream_id for _, s in summaries}


def wait_for_streams(browser: Browser, expected: PageStreams, timeout_s: float) -> dict[str, Any]:
    """What the page shows (SHOWN) once its streams are `expected`; fails with both at the
    timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        shown: dict[str, Any] = browser.evaluate(SHOWN)
        if shown["streams"] == expected:
            return shown
        if time.monotonic() >= deadline:
            pytest.fail(
                f"the page shows {json.dumps(shown['streams'], sort_keys=True)}\n"
                f"the topic holds {json.dumps(expected, sort_keys=True)}",
                pytrace=False,
            )
        time.sleep(0.2)


def assert_table(rows: list[list[Any]], expected: PageStreams) -> None:
    """The table: the latest 25 windows, newest first (then by stream), with the topic's
    face counts."""
    windows = sorted((start, stream) for stream, ws in expected.items() for start in ws)
    windows.sort(key=lambda window: window[1])
    windows.sort(key=lambda window: window[0], reverse=True)  # stable: streams stay sorted
    assert [(start, stream) for stream, start, _ in rows] == windows[:25]
    for stream, start, faces in rows:
        assert faces == expected[stream][start]["faces"], (stream, start)
