"""`emotion-worker replay`: dead letters back onto the input topic, each exactly once.

On the real broker: a worker running all along turns the replayed letters into one result
each; a second replay republishes nothing; permanent kinds wait until named; --dry-run and
--since write nothing; a replay that dies inside a transaction republishes nothing twice.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer

from consumer.cli import main
from consumer.config import KafkaSettings
from consumer.replay import replayer as replayer_module
from consumer.replay.replayer import Replayer, ReplayError
from consumer.stream.records import FailedEvent, InputRecord
from consumer.stream.stages import encode_dead_letter
from schemas import DeadLetter, EmotionResult, ErrorKind
from tests.support.events import event_bytes
from tests.support.kafka import (
    Record,
    end_offsets,
    produce,
    read_to_end,
)
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.kafka

TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def group(monkeypatch: pytest.MonkeyPatch, topic_factory: Callable[..., str]) -> Iterator[str]:
    """The worker's group id, which also names the replay's progress groups."""
    name = f"group-{topic_factory('g', 1)}"
    monkeypatch.setenv("EMOTION_WORKER_KAFKA__GROUP_ID", name)
    yield name


def _replay(capsys: pytest.CaptureFixture[str], bootstrap: str, *flags: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["replay", "--bootstrap-servers", bootstrap, *flags])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _wait_for(what: str, check: Callable[[], bool], timeout_s: float = 90.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _letters(bootstrap: str, topic: str) -> list[DeadLetter]:
    records = read_to_end(bootstrap, topic)
    return [DeadLetter.from_record(r.key, r.value, r.headers) for r in records]


def test_replay_with_a_worker_running_gives_one_result_per_letter(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    start_worker: Callable[..., WorkerProcess],
    face_paths: list[Path],
    tmp_path: Path,
    group: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    frames, out, dead = (topic_factory(name, 2) for name in ("frames", "emotions", "dead"))
    # Images uploaded late: their events fail as image_not_found, a transient kind.
    late = tmp_path / "late"
    late.mkdir()
    events = [
        event_bytes(
            face_paths[i],
            stream_id=f"s{i % 3}",
            event_id=f"late-{i}",
            image=(late / f"{i}.png").as_uri(),
        )
        for i in range(12)
    ]
    poison: list[tuple[bytes | None, bytes]] = [(b"s0", b"{not json %d" % i) for i in range(4)]
    produce(kafka_bootstrap, frames, [*events, *poison], headers=[("traceparent", TRACEPARENT)])
    worker = start_worker(
        kafka__input_topic=frames,
        kafka__output_topic=out,
        kafka__dead_letter_topic=dead,
        kafka__group_id=group,
        fetch__retries="0",
    )
    _wait_for("16 dead letters", lambda: sum(end_offsets(kafka_bootstrap, dead, 2).values()) == 16)
    letters = _letters(kafka_bootstrap, dead)
    assert sorted(x.error_kind for x in letters) == ["image_not_found"] * 12 + ["not_json"] * 4
    assert all(x.headers == [("traceparent", TRACEPARENT)] for x in letters)
    flags = ("--from", dead, "--to", frames)
    before = end_offsets(kafka_bootstrap, frames, 2)

    code, text = _replay(capsys, kafka_bootstrap, *flags, "--dry-run")
    assert code == 0, text
    assert "would republish 12 dead letter(s)" in text, text
    assert end_offsets(kafka_bootstrap, frames, 2) == before  # a dry run writes nothing
    # (No transaction of its own either: end offsets of the input stay exactly as they were.)

    for i in range(12):  # the upload arrives
        shutil.copy(face_paths[i], late / f"{i}.png")
    code, text = _replay(capsys, kafka_bootstrap, *flags)
    assert code == 0, text
    assert "republished 12 dead letter(s)" in text, text
    # Records, not end offsets: the commit markers follow commit_transaction() shortly.
    assert len(read_to_end(kafka_bootstrap, frames)) == 16 + 12

    # The worker, running all along, turns each replayed letter into exactly one result
    # (its commits cannot be compared with the end offsets: the replay's transaction
    # markers take an offset each that no consumer is handed).
    _wait_for("12 results", lambda: sum(end_offsets(kafka_bootstrap, out, 2).values()) >= 12)
    assert worker.stop() == 0, worker.log_text()[-3000:]  # drains what is in flight
    outputs = read_to_end(kafka_bootstrap, out)
    results = [EmotionResult.model_validate_json(r.value) for r in outputs]
    assert sorted(r.event_id for r in results) == sorted(f"late-{i}" for i in range(12))
    assert all(r.status == "ok" for r in results)
    assert sum(end_offsets(kafka_bootstrap, dead, 2).values()) == 16
    replayed = [r for r in read_to_end(kafka_bootstrap, frames) if r.offset >= before[r.partition]]
    assert all(dict(r.headers) == {"traceparent": TRACEPARENT} for r in replayed)
    assert sorted(r.value for r in replayed) == sorted(v for _, v in events)

    # Once: a second replay finds every transient letter replayed before.
    code, text = _replay(capsys, kafka_bootstrap, *flags)
    assert code == 0 and "republished 0 dead letter(s)" in text, text
    assert len(read_to_end(kafka_bootstrap, frames)) == 16 + 12
    # Permanent kinds wait until named; naming them replays them (they fail again).
    code, text = _replay(capsys, kafka_bootstrap, *flags, "--kind", "not_json", "--dry-run")
    assert code == 0 and "would republish 4 dead letter(s)" in text, text


def _write_letters(bootstrap: str, topic: str, count: int) -> None:
    """Dead letters as the worker writes them (encode_dead_letter), without a worker:
    even numbers image_fetch_failed, odd ones invalid_event; the value is {"n": n}."""
    producer = Producer({"bootstrap.servers": bootstrap})
    for n in range(count):
        record = InputRecord("frames", 0, n, b"cam", json.dumps({"n": n}).encode())
        kind: ErrorKind = "image_fetch_failed" if n % 2 == 0 else "invalid_event"
        letter = encode_dead_letter(FailedEvent(record, kind, "down", 1), topic)
        producer.produce(topic, key=letter.key, value=letter.value, headers=letter.headers)
    assert producer.flush(30) == 0


def _replayed(records: list[Record]) -> list[int]:
    return sorted(json.loads(r.value)["n"] for r in records)


def test_a_replay_that_dies_mid_transaction_republishes_nothing_twice(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    group: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The crash is simulated (an exception out of the loop, not a SIGKILL, whose moment
    cannot be aimed between a produce and its commit); what the broker sees is a real
    crash's: a transaction left open, aborted when the next replay's producer fences it."""
    dead, frames = topic_factory("dead", 1), topic_factory("frames", 1)
    _write_letters(kafka_bootstrap, dead, 40)  # 20 image_fetch_failed, 20 invalid_event
    settings = KafkaSettings(bootstrap_servers=kafka_bootstrap, group_id=group)
    monkeypatch.setattr(replayer_module, "LETTERS_PER_TRANSACTION", 3)
    real_one = Replayer._one
    seen = {"n": 0}

    def crashing_one(self: Replayer, *args: object) -> int:
        seen["n"] += 1
        if seen["n"] == 27:
            raise RuntimeError("simulated crash")
        return real_one(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Replayer, "_one", crashing_one)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Replayer(settings, dead, frames, ("image_fetch_failed",), None).run()
    monkeypatch.setattr(Replayer, "_one", real_one)
    first = read_to_end(kafka_bootstrap, frames)
    # 26 records read, 13 of them republished: 4 transactions of 3 committed, and the
    # 13th letter's, open at the crash, invisible to read_committed readers.
    assert _replayed(first) == list(range(0, 24, 2))

    report = Replayer(settings, dead, frames, ("image_fetch_failed",), None).run()
    assert report.replayed == 8
    assert _replayed(read_to_end(kafka_bootstrap, frames)) == list(range(0, 40, 2))
    # The other kind's progress is its own: it was read but not chosen, and is still there.
    report = Replayer(settings, dead, frames, ("invalid_event",), None).run()
    assert report.replayed == 20
    assert _replayed(read_to_end(kafka_bootstrap, frames)) == list(range(40))


def test_since_and_unknown_kinds(
    kafka_bootstrap: str,
    topic_factory: Callable[..., str],
    group: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dead, frames = topic_factory("dead", 1), topic_factory("frames", 1)
    _write_letters(kafka_bootstrap, dead, 6)
    flags = ("--from", dead, "--to", frames)
    code, text = _replay(capsys, kafka_bootstrap, *flags, "--since", "2999-01-01T00:00:00Z")
    assert code == 0 and "republished 0 dead letter(s)" in text, text
    assert "before since" in text
    code, text = _replay(capsys, kafka_bootstrap, *flags, "--kind", "colour")
    assert code == 2 and "--kind colour is not an error kind" in text, text
    code, text = _replay(capsys, kafka_bootstrap, *flags, "--since", "yesterday")
    assert code == 2 and "--since 'yesterday'" in text, text
    code, text = _replay(capsys, kafka_bootstrap, "--from", "no-such-topic", "--to", frames)
    assert code == 1 and "no-such-topic" in text, text
    assert sum(end_offsets(kafka_bootstrap, frames, 1).values()) == 0
    with pytest.raises(ReplayError, match="no-such-topic"):
        Replayer(
            KafkaSettings(bootstrap_servers=kafka_bootstrap),
            "no-such-topic",
            frames,
            ("model_error",),
            None,
        ).run()
