"""The live page's pieces without a network: the summary store, SSE framing, subscriptions,
and the access rules."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from consumer.config import DashboardSettings
from consumer.dashboard.auth import authorized, exposure_problem, is_loopback, local_host_header
from consumer.dashboard.live import LiveSummaries, Subscription, format_comment, format_event
from consumer.dashboard.store import SummaryStore
from tests.support.summaries import window_summary

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def starts(store: SummaryStore, stream: str) -> list[float]:
    return [(w.window_start - T0).total_seconds() for w in store.windows(stream)]


# ----------------------------------------------------------------------------- the store


def test_windows_come_out_oldest_first_and_streams_by_name() -> None:
    store = SummaryStore(timedelta(minutes=10), max_streams=8)
    for stream, second in (("cam-b", 20), ("cam-a", 10), ("cam-b", 0), ("cam-a", 0)):
        assert store.add(window_summary(stream, at(second), {"happy": 1}))
    assert store.streams() == ["cam-a", "cam-b"]
    assert starts(store, "cam-a") == [0, 10]
    assert starts(store, "cam-b") == [0, 20]
    assert len(store) == 4
    snapshot = store.snapshot()
    assert snapshot["history_minutes"] == 10
    assert [s["stream_id"] for s in snapshot["streams"]] == ["cam-a", "cam-b"]
    assert snapshot["streams"][1]["windows"][1]["window_start"] == "2026-12-01T08:00:20Z"


def test_history_is_bounded_by_each_streams_newest_window() -> None:
    store = SummaryStore(timedelta(seconds=60), max_streams=8)
    for second in range(0, 100, 10):
        store.add(window_summary("cam-a", at(second), {"sad": 1}))
    # Newest window ends at 100 s: windows ending at or before 40 s are gone.
    assert starts(store, "cam-a") == [40, 50, 60, 70, 80, 90]
    # A late window older than the horizon changes nothing...
    assert not store.add(window_summary("cam-a", at(20), {"sad": 5}))
    assert starts(store, "cam-a") == [40, 50, 60, 70, 80, 90]
    # ...and another stream keeps its own horizon (its camera clock may be hours off).
    assert store.add(window_summary("cam-b", at(-3600), {"sad": 1}))
    assert starts(store, "cam-b") == [-3600]


def test_windows_per_stream_are_capped_whatever_their_length() -> None:
    store = SummaryStore(timedelta(minutes=10), max_streams=8, max_windows=5)
    for second in range(20):
        store.add(window_summary("cam-a", at(second), {"happy": 1}, seconds=1))
    assert starts(store, "cam-a") == [15, 16, 17, 18, 19]


def test_a_later_record_of_a_window_replaces_it_an_older_one_does_not() -> None:
    store = SummaryStore(timedelta(minutes=10), max_streams=8)
    first = window_summary("cam-a", at(0), {"happy": 2}, closed_at=at(12))
    assert store.add(first)
    assert not store.add(first), "the same record again (an at-least-once duplicate)"
    newer = window_summary("cam-a", at(0), {"happy": 2, "sad": 3}, closed_at=at(30))
    assert store.add(newer)
    assert store.windows("cam-a") == [newer]
    older = window_summary("cam-a", at(0), {"angry": 9}, closed_at=at(11))
    assert not store.add(older), "a replayed older copy must not win"
    assert store.windows("cam-a") == [newer]


def test_beyond_max_streams_the_stalest_stream_is_dropped() -> None:
    store = SummaryStore(timedelta(minutes=10), max_streams=2)
    store.add(window_summary("cam-a", at(100), {"happy": 1}))
    store.add(window_summary("cam-b", at(0), {"happy": 1}))
    assert store.add(window_summary("cam-c", at(50), {"happy": 1}))
    assert store.streams() == ["cam-a", "cam-c"]
    # A newcomer staler than every stream held is the one dropped.
    assert not store.add(window_summary("cam-d", at(-50), {"happy": 1}))
    assert store.streams() == ["cam-a", "cam-c"]


def test_store_refuses_nonsense_bounds() -> None:
    with pytest.raises(ValueError):
        SummaryStore(timedelta(0), max_streams=1)


# ------------------------------------------------------------------- server-sent events


def test_an_event_is_its_fields_then_a_blank_line() -> None:
    assert format_event('{"a":1}', event="summary") == b'event: summary\ndata: {"a":1}\n\n'
    assert format_event("x", event_id="7") == b"id: 7\ndata: x\n\n"
    assert format_comment() == b": keep-alive\n\n"


def test_every_line_of_the_data_gets_its_own_data_field() -> None:
    assert format_event("one\ntwo\r\nthree\rfour") == (
        b"data: one\ndata: two\ndata: three\ndata: four\n\n"
    )
    assert format_event("") == b"data: \n\n"


def test_an_event_name_cannot_smuggle_a_line() -> None:
    with pytest.raises(ValueError, match="one line"):
        format_event("x", event="summary\ndata: forged")
    with pytest.raises(ValueError, match="one line"):
        format_event("x", event_id="1\r2")


def test_a_subscription_hands_over_what_arrived_and_ends_on_close_or_overflow() -> None:
    subscription = Subscription(limit=2)
    assert subscription.next(0.01) == []  # nothing yet: a keep-alive is due
    subscription.push("a")
    subscription.push("b")
    assert subscription.next(0.01) == ["a", "b"]
    subscription.push("c")
    subscription.push("d")
    subscription.push("e")  # a page this far behind reconnects for a fresh snapshot
    assert subscription.overflowed
    assert subscription.next(0.01) is None
    closed = Subscription(limit=2)
    closed.close()
    assert closed.next(5) is None


def test_a_new_page_gets_the_snapshot_and_then_every_new_summary() -> None:
    live = LiveSummaries(SummaryStore(timedelta(minutes=10), 8), "sums", max_subscribers=1)
    live.add(window_summary("cam-a", at(0), {"happy": 1}))
    subscribed = live.subscribe()
    assert subscribed is not None
    snapshot, subscription = subscribed
    assert snapshot["topic"] == "sums"
    assert snapshot["labels"] == [
        "angry", "disgusted", "fearful", "happy", "neutral", "sad", "surprised"
    ]  # fmt: skip
    assert [s["stream_id"] for s in snapshot["streams"]] == ["cam-a"]
    assert live.subscribe() is None, "max_subscribers"
    assert live.add(window_summary("cam-b", at(0), {"sad": 2}))
    assert not live.add(window_summary("cam-b", at(0), {"sad": 2})), "a duplicate is not sent"
    (item,) = subscription.next(1) or []
    assert '"stream_id":"cam-b"' in item
    live.unsubscribe(subscription)
    assert subscription.next(1) is None
    assert live.subscribe() is not None


# ------------------------------------------------------------------------------- access


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("dashboard.example.com", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_the_network_without_a_token_is_refused_naming_the_setting() -> None:
    assert exposure_problem(DashboardSettings()) is None  # 127.0.0.1 by default
    problem = exposure_problem(DashboardSettings(host="0.0.0.0"))
    assert problem is not None
    assert "dashboard.auth_token" in problem and "EMOTION_WORKER_DASHBOARD__AUTH_TOKEN" in problem
    with_token = DashboardSettings(host="0.0.0.0", auth_token="s3cret-s3cret-s3cret")  # type: ignore[arg-type]
    assert exposure_problem(with_token) is None


def test_a_token_is_accepted_as_bearer_or_as_the_basic_auth_password() -> None:
    token = "s3cret-s3cret-s3cret"
    basic = base64.b64encode(f"anyone:{token}".encode()).decode()
    assert authorized(f"Bearer {token}", token)
    assert authorized(f"bearer  {token} ", token)
    assert authorized(f"Basic {basic}", token)
    wrong = base64.b64encode(b"anyone:guess").decode()
    for header in (None, "", f"Bearer {token}x", f"Basic {wrong}", "Basic !!!", token):
        assert not authorized(header, token), header


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        ("127.0.0.1:8080", True),
        ("localhost:8080", True),
        ("localhost", True),
        ("[::1]:8080", True),
        ("evil.example:8080", False),
        ("127.0.0.1.evil.example", False),
        (None, False),
    ],
)
def test_without_a_token_only_local_host_names_are_served(header: str | None, ok: bool) -> None:
    """A DNS-rebinding page (its own name pointed at 127.0.0.1) is refused."""
    assert local_host_header(header, "127.0.0.1") is ok
