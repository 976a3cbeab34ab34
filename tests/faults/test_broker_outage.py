"""The broker goes away mid-stream for longer than the producer's retry window."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deploy.kafka.local_broker import LocalKafkaBroker, free_port
from schemas import EmotionResult
from tests.faults.checker import Stream
from tests.support.kafka import end_offsets, read_to_end
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.kafka

RETRY_WINDOW_MS = 4000


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalKafkaBroker]:
    """A broker of this test's own (it is stopped and started again), with kept data."""
    broker = LocalKafkaBroker(data_dir=tmp_path / "kafka", port=free_port())
    broker.start()
    yield broker
    broker.stop()


def _covered_below_committed(stream: Stream) -> list[str]:
    """Offsets below a committed offset that have no result: commits past unacked work."""
    records = read_to_end(stream.bootstrap, stream.output_topic)
    have = {
        (r.source.partition, r.source.offset)
        for r in (EmotionResult.model_validate_json(x.value) for x in records)
    }
    problems = []
    for partition, committed in stream.committed().items():
        for offset in range(max(committed, 0)):
            if (partition, offset) in stream.sent and (partition, offset) not in have:
                problems.append(f"{partition}@{offset}")
    return problems


def test_broker_outage_longer_than_retry_window(
    own_broker: LocalKafkaBroker,
    make_stream: Callable[..., Stream],
    start_worker: Callable[..., WorkerProcess],
    face_paths: list[Path],
    paced_images: str,
) -> None:
    stream = make_stream(partitions=2, bootstrap=own_broker.bootstrap_servers)
    stream.publish(face_paths, 300, image_url=paced_images)
    settings = stream.settings(
        kafka__bootstrap_servers=own_broker.bootstrap_servers,
        kafka__producer_config=f'{{"message.timeout.ms": {RETRY_WINDOW_MS}}}',
        # The failed worker could not tell the (stopped) broker that it left; the group
        # waits one session timeout for it before the restarted worker gets partitions.
        kafka__consumer_config='{"session.timeout.ms": 6000}',
        batch__max_batch_size="4",
        fetch__threads="1",
    )
    worker = start_worker(**settings)
    stream.wait_for_results(40, timeout_s=90)
    own_broker.stop(keep_data=True)
    time.sleep(RETRY_WINDOW_MS / 1000 * 2)  # well past the producer's retry window
    code = worker.proc.wait(60)  # results it could not deliver end the worker
    own_broker.start()
    stream.mark_fault("the failed worker")  # nothing below its commits may come out again
    assert code == 1, worker.log_text()[-3000:]
    failure = [e for e in worker.log_events() if e.get("event") == "worker failing"]
    assert failure and "not delivered" in str(failure[0]["reason"])
    assert _covered_below_committed(stream) == []  # nothing committed past unacked results

    again = start_worker(**settings)
    stream.results(timeout_s=120)
    assert again.stop() == 0, again.log_text()[-3000:]
    report = stream.report("3. broker down > retry window", note=f"worker exited {code}, restarted")
    assert report.missing == 0
    assert report.order_violations == 0
    assert stream.committed() == end_offsets(stream.bootstrap, stream.input_topic, 2)
