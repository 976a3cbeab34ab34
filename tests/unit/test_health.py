"""Probes and metrics over real HTTP: what /readyz and /livez answer, state by state."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumer.config import ConfigError
from consumer.ops.health import HealthServer
from consumer.ops.metrics import HealthState, WorkerMetrics, lag_from_statistics


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


# ---- a health port that is taken --------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another program (this test) is listening on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


def test_a_taken_port_is_a_config_error_naming_health_port(taken_port: int) -> None:
    with pytest.raises(ConfigError) as info:
        HealthServer("127.0.0.1", taken_port, WorkerMetrics(), HealthState(1.0, 1.0))
    message = str(info.value)
    assert f"health.port={taken_port}" in message and "already in use" in message
    assert "0 to pick any free port" in message and "health.enabled = false" in message


def _run_cli(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("EMOTION_WORKER_")}
    return subprocess.run(
        [sys.executable, "-m", "consumer.cli", "run", "--model-path", str(tmp_path / "none")],
        env={**clean, "EMOTION_WORKER_HEALTH__HOST": "127.0.0.1", **env},
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
    )


def test_second_worker_on_a_taken_health_port_exits_2_without_traceback(
    taken_port: int, tmp_path: Path
) -> None:
    run = _run_cli({"EMOTION_WORKER_HEALTH__PORT": str(taken_port)}, tmp_path)
    assert run.returncode == 2, run.stderr
    assert "configuration error" in run.stderr and f"health.port={taken_port}" in run.stderr
    assert "already in use" in run.stderr and "0 to pick any free port" in run.stderr
    assert "Traceback" not in run.stderr and "Errno" not in run.stderr


def test_supervised_worker_on_a_taken_health_port_fails_the_supervisor_plainly(
    taken_port: int, tmp_path: Path
) -> None:
    # Child 0 takes health.port itself: it reports the setting and exits 2; the
    # supervisor stops the other child and fails.
    run = _run_cli(
        {
            "EMOTION_WORKER_HEALTH__PORT": str(taken_port),
            "EMOTION_WORKER_PROCESSES__DEVICES": '["cpu", "cpu"]',
        },
        tmp_path,
    )
    assert run.returncode == 1, run.stderr
    assert f"health.port={taken_port}" in run.stderr and "already in use" in run.stderr
    assert "Traceback" not in run.stderr
