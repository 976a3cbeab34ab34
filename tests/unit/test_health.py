"""Probes and metrics over real HTTP: what /readyz and /livez answer, state by state."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from consumer.health import HealthServer
from consumer.metrics import HealthState, WorkerMetrics, lag_from_statistics


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def served() -> Iterator[tuple[str, WorkerMetrics, HealthState]]:
    metrics = WorkerMetrics()
    health = HealthState(loop_stall_s=0.5, stall_timeout_s=0.5)
    server = HealthServer("127.0.0.1", 0, metrics, health).start()
    yield f"http://127.0.0.1:{server.port}", metrics, health
    server.close()


def test_ready_only_with_the_model_warm_and_subscribed(
    served: tuple[str, WorkerMetrics, HealthState],
) -> None:
    url, _, health = served
    assert get(url + "/readyz") == (503, "model not loaded and warmed yet\n")
    health.model_ready = True
    assert get(url + "/readyz")[0] == 503  # not subscribed yet
    health.subscribed = True
    assert get(url + "/readyz") == (200, "ready\n")
    assert "emotion_worker_ready 1.0" in get(url + "/metrics")[1]
    health.stopping = True
    assert get(url + "/readyz") == (503, "stopping\n")


def test_live_until_the_poll_loop_stalls(served: tuple[str, WorkerMetrics, HealthState]) -> None:
    url, _, health = served
    # Before the loop starts (model loading) the worker is alive.
    time.sleep(0.6)
    assert get(url + "/livez")[0] == 200
    health.loop_turned()
    assert get(url + "/livez")[0] == 200
    time.sleep(0.6)
    code, body = get(url + "/livez")
    assert code == 503 and "poll loop has not turned" in body
    health.loop_turned()
    assert get(url + "/livez")[0] == 200


def test_not_live_with_lag_and_no_progress(served: tuple[str, WorkerMetrics, HealthState]) -> None:
    url, _, health = served
    health.loop_turned()  # consuming
    health.set_lag({("frames", 0): 0})
    time.sleep(0.6)
    health.loop_turned()
    assert get(url + "/livez")[0] == 200  # idle: no lag, no progress needed
    health.set_lag({("frames", 0): 5, ("frames", 1): -1})
    code, body = get(url + "/livez")
    assert code == 503 and "lag 5 but no offset advanced" in body
    health.progressed()
    assert get(url + "/livez")[0] == 200


def test_metrics_page_and_unknown_paths(served: tuple[str, WorkerMetrics, HealthState]) -> None:
    url, metrics, _ = served
    metrics.events_consumed.inc(3)
    metrics.dead_letters.labels(reason="not_json").inc()
    code, text = get(url + "/metrics")
    assert code == 200
    assert "emotion_worker_events_consumed_total 3.0" in text
    assert 'emotion_worker_dead_letters_total{reason="not_json"} 1.0' in text
    assert get(url + "/nope")[0] == 404


def test_lag_from_librdkafka_statistics() -> None:
    def part(state: str, **offsets: int) -> dict[str, object]:
        return {"fetch_state": state, **offsets}

    stats = {
        "topics": {
            "frames": {
                "partitions": {
                    # committed: end (last stable offset) minus committed
                    "0": part("active", lo_offset=0, ls_offset=50, committed_offset=38),
                    # nothing committed yet: from the log start (a stuck first batch shows)
                    "1": part("active", lo_offset=5, ls_offset=25, committed_offset=-1001),
                    # no last stable offset known: the high watermark
                    "2": part("active", lo_offset=0, hi_offset=9, ls_offset=-1, committed_offset=4),
                    # not ours, and librdkafka's internal UA partition
                    "3": part("none", lo_offset=0, ls_offset=40, committed_offset=0),
                    "-1": part("none"),
                }
            }
        }
    }
    assert lag_from_statistics(json.dumps(stats)) == {
        ("frames", 0): 12,
        ("frames", 1): 20,
        ("frames", 2): 5,
    }


def test_a_slow_model_load_does_not_count_as_a_stall(
    served: tuple[str, WorkerMetrics, HealthState],
) -> None:
    url, _, health = served
    health.set_lag({("frames", 0): 7})
    time.sleep(0.6)  # longer than stall_timeout_s, all of it "loading the model"
    health.loop_turned()  # consuming starts now
    assert get(url + "/livez")[0] == 200
