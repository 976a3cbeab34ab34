"""Two worker processes under one supervisor (processes.devices=["cpu", "cpu"]), one group.

CPU stands in for two GPUs: the supervisor's job (one pinned child per device, one
consumer group, signals, deaths) does not depend on the device.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import ConsumerGroupState
from confluent_kafka.admin import AdminClient

from schemas import EmotionResult
from tests.support.events import event_bytes
from tests.support.kafka import committed, end_offsets, produce, read
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.kafka

TWO_CPUS = '["cpu", "cpu"]'


def _members(bootstrap: str, group: str) -> tuple[object, list[Any]]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        description = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
    except Exception:  # not created yet
        return None, []
    return description.state, list(description.members)


def wait_for_split(
    bootstrap: str, group: str, topic: str, supervisor: WorkerProcess, timeout_s: float = 180
) -> list[Any]:
    """Until the group is stable with two members holding one partition of `topic` each."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state, members = _members(bootstrap, group)
        held = sorted(
            sorted(tp.partition for tp in m.assignment.topic_partitions if tp.topic == topic)
            for m in members
        )
        if state == ConsumerGroupState.STABLE and held == [[0], [1]]:
            return members
        if supervisor.proc.poll() is not None:
            raise AssertionError(f"supervisor exited {supervisor.proc.returncode}")
        time.sleep(0.5)
    raise AssertionError(f"group never split 1+1: {supervisor.log_text()[-4000:]}")


def child_pids(supervisor: WorkerProcess) -> dict[int, int]:
    """index -> pid of each child, from the supervisor's "worker process started" lines."""
    return {
        int(str(e["index"])): int(str(e["pid"]))
        for e in supervisor.log_events()
        if e.get("event") == "worker process started"
    }


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_leftovers(pids: dict[int, int]) -> None:
    """A failed test must not leave a child running (it would hold its partition)."""
    for pid in pids.values():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_two_processes_share_the_input_and_each_event_gets_one_result(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_worker: Callable[..., WorkerProcess],
    face_paths: list[Path],
) -> None:
    frames = topic_factory("frames", 2)
    results_topic = topic_factory("emotions", 2)
    dead = topic_factory("dead", 1)
    group = f"group-{frames}"
    supervisor = start_worker(
        processes__devices=TWO_CPUS,
        kafka__input_topic=frames,
        kafka__output_topic=results_topic,
        kafka__dead_letter_topic=dead,
        kafka__group_id=group,
        # Static membership: it only works if each process gets its own instance id.
        kafka__group_instance_id=f"pod-{frames}",
    )
    pids: dict[int, int] = {}
    try:
        members = wait_for_split(kafka_bootstrap, group, frames, supervisor)
        pids = child_pids(supervisor)
        assert sorted(pids) == [0, 1]
        assert sorted(str(m.group_instance_id) for m in members) == [
            f"pod-{frames}-0",
            f"pod-{frames}-1",
        ]

        count = 200
        values: list[tuple[bytes | None, bytes]] = [
            event_bytes(p, stream_id=f"cam-{i % 4}") for i, p in enumerate(face_paths)
        ]
        values = (values * (count // len(values) + 1))[:count]
        coords = produce(kafka_bootstrap, frames, values, spread=2)
        records = read(kafka_bootstrap, results_topic, expected=count, timeout_s=240, idle_s=2.0)

        assert supervisor.stop() == 0, supervisor.log_text()[-4000:]
        assert not any(_alive(pid) for pid in pids.values())
    finally:
        _kill_leftovers(pids)

    results = [EmotionResult.model_validate_json(r.value) for r in records]
    seen = [(r.source.partition, r.source.offset) for r in results]
    assert len(seen) == len(set(seen)) == count  # none duplicated
    assert set(seen) == set(coords)  # none missing
    assert all(r.status == "ok" for r in results)
    ends = end_offsets(kafka_bootstrap, frames, 2)
    assert ends == {0: count // 2, 1: count // 2}
    assert committed(kafka_bootstrap, group, frames, 2) == ends
    exits = [e for e in supervisor.log_events() if e.get("event") == "worker process exited"]
    assert sorted((e["index"], e["code"]) for e in exits) == [(0, 0), (1, 0)]


def test_a_killed_child_stops_the_other_and_the_supervisor_fails(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_worker: Callable[..., WorkerProcess],
) -> None:
    frames = topic_factory("frames", 2)
    group = f"group-{frames}"
    supervisor = start_worker(
        processes__devices=TWO_CPUS,
        kafka__input_topic=frames,
        kafka__output_topic=topic_factory("emotions", 1),
        kafka__dead_letter_topic=topic_factory("dead", 1),
        kafka__group_id=group,
    )
    pids: dict[int, int] = {}
    try:
        wait_for_split(kafka_bootstrap, group, frames, supervisor)
        pids = child_pids(supervisor)
        os.kill(pids[1], signal.SIGKILL)
        assert supervisor.proc.wait(90) == 1, supervisor.log_text()[-4000:]
        supervisor.stop()  # already exited: only closes its log
        assert not any(_alive(pid) for pid in pids.values())  # no orphan
    finally:
        _kill_leftovers(pids)
    exits = {
        int(str(e["index"])): e
        for e in supervisor.log_events()
        if e.get("event") == "worker process exited"
    }
    assert exits[1]["signal"] == "SIGKILL" and exits[1]["unexpected"] is True
    assert exits[0]["code"] == 0  # the survivor drained and closed cleanly
    assert exits[0]["device"] == "cpu"
