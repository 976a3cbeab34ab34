"""The checker's own checks fail on bad outcomes: fake records, no worker, no broker.

(One test at the end uses the broker: the reader leaves out what a transaction aborted.)
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable

import pytest

from tests.faults.checker import Fault, FaultReport, Outcome, Sent, tally
from tests.support.kafka import (
    NO_COMMIT,
    TopicReader,
    commit_progress,
    end_offsets,
    wait_for_commit_progress,
)

TOPIC = "frames-test"
# Partition 0 offsets 0-5 and partition 1 offsets 0-3 hold good events n000000..n000009;
# partition 1 offset 4 holds a poison record.
SENT = {
    (p, o): Sent(f"n{n:06d}", f"value-{n}".encode())
    for n, (p, o) in enumerate([(0, o) for o in range(6)] + [(1, o) for o in range(4)])
} | {(1, 4): Sent(None, b"\x00poison", poison=True)}


def result(p: int, o: int, event_id: str | None = None, at_ms: int = 1000) -> Outcome:
    event_id = event_id if event_id is not None else SENT[(p, o)].event_id
    return Outcome("result", TOPIC, p, o, event_id, "s0", None, at_ms)


def letter(p: int, o: int, value: bytes | None = None, at_ms: int = 1000) -> Outcome:
    value = value if value is not None else SENT[(p, o)].value
    return Outcome("dead letter", TOPIC, p, o, None, None, value, at_ms)


def good_run() -> list[Outcome]:
    return [result(*c) for c, s in SENT.items() if not s.poison] + [letter(1, 4)]


def check(outcomes: list[Outcome], faults: list[Fault] | None = None) -> FaultReport:
    return tally("test", TOPIC, SENT, outcomes, faults or [])


def test_a_complete_run_passes_and_counts_dead_letters_as_outcomes() -> None:
    report = check(good_run())
    assert report.complete, report.problems
    assert (report.produced, report.results, report.dead_letters) == (11, 10, 1)
    assert report.results + report.dead_letters == report.produced == report.distinct
    assert report.problems == []


def test_an_offset_with_neither_result_nor_dead_letter_is_missing() -> None:
    report = check([o for o in good_run() if o.coord != (0, 3)])
    assert not report.complete
    assert report.missing == 1 and report.distinct == report.produced - 1
    assert any("0@3" in p and "no outcome" in p for p in report.problems)
    # The poison's dead letter is what covers it: without it, it is missing too.
    assert check([o for o in good_run() if o.kind == "result"]).missing == 1


def test_a_result_naming_another_event_is_wrong() -> None:
    outcomes = good_run()
    outcomes[2] = result(0, 2, event_id="n000005")  # offset 2's result says it is event 5
    report = check(outcomes)
    assert not report.complete
    assert report.wrong_event == 1 and report.missing == 0
    assert any("names n000005, sent n000002" in p for p in report.problems)


def test_a_dead_letter_carrying_other_bytes_is_wrong() -> None:
    outcomes = [o for o in good_run() if o.kind == "result"] + [letter(1, 4, value=b"other")]
    report = check(outcomes)
    assert not report.complete and report.wrong_event == 1


def test_an_outcome_at_an_offset_never_sent_is_unsent() -> None:
    for stray in (
        result(0, 6, event_id="n000006"),  # past the end of partition 0
        result(2, 0, event_id="n000000"),  # a partition nothing was sent to
        Outcome("result", "another-topic", 0, 0, "n000000", "s0", None, 1000),
    ):
        report = check([*good_run(), stray])
        assert not report.complete, stray
        assert report.unsent == 1 and report.distinct == report.produced
        assert any("nothing was produced there" in p for p in report.problems)


def test_a_good_event_dead_lettered_or_a_poison_with_a_result_is_misrouted() -> None:
    outcomes = [o for o in good_run() if o.coord != (0, 1)] + [letter(0, 1)]
    assert check(outcomes).misrouted == 1 and not check(outcomes).complete
    poisoned = [o for o in good_run() if o.coord != (1, 4)] + [result(1, 4, event_id="x")]
    report = check(poisoned)
    assert report.misrouted == 1 and not report.complete


def test_duplicates_at_or_above_the_commit_of_the_kill_pass() -> None:
    kill = Fault("kill 1", at_ms=2000, committed={0: 3, 1: NO_COMMIT})
    # Offsets 3 and 4 of partition 0 (>= the commit 3) and 1@0 (nothing committed there)
    # came out before the kill and again after it: redelivered, as at-least-once allows.
    again = [result(0, 3, at_ms=2500), result(0, 4, at_ms=2500), result(1, 0, at_ms=2600)]
    report = check(good_run() + again, [kill])
    assert report.complete, report.problems
    assert report.duplicates == 3 and report.dup_below_commit == 0


def test_a_duplicate_below_the_commit_of_the_kill_fails() -> None:
    kill = Fault("kill 1", at_ms=2000, committed={0: 3, 1: 2})
    again = [result(0, 2, at_ms=2500), result(1, 1, at_ms=2500)]  # both below the commit
    report = check(good_run() + again, [kill])
    assert not report.complete
    assert report.duplicates == 2 and report.dup_below_commit == 2
    assert any("0@2 again after kill 1" in p for p in report.problems)


def test_each_kill_is_judged_by_its_own_commit() -> None:
    kills = [
        Fault("kill 1", at_ms=2000, committed={0: 1}),
        Fault("kill 2", at_ms=4000, committed={0: 4}),
    ]
    # 0@2 again after kill 1 (2 >= commit 1): allowed. 0@3 again after kill 2, though
    # kill 2's worker had committed up to 4: not allowed.
    ok = check([*good_run(), result(0, 2, at_ms=3000)], kills)
    assert ok.complete and ok.dup_below_commit == 0
    bad = check([*good_run(), result(0, 2, at_ms=3000), result(0, 3, at_ms=5000)], kills)
    assert bad.dup_below_commit == 1 and not bad.complete
    assert any("0@3 again after kill 2" in p for p in bad.problems)


def test_a_worker_that_commits_only_at_shutdown_never_shows_commit_progress() -> None:
    """What test_crashes waits for before each kill: commits while the worker runs."""
    never = itertools.repeat({0: NO_COMMIT, 1: NO_COMMIT})
    with pytest.raises(AssertionError, match="no commit in"):
        wait_for_commit_progress(lambda: next(never), {}, timeout_s=0.5, every_s=0.05)
    # Committed at the previous kill, and not a step further since.
    same = itertools.repeat({0: 40, 1: 12})
    with pytest.raises(AssertionError, match="no commit in"):
        wait_for_commit_progress(lambda: next(same), {0: 40, 1: 12}, timeout_s=0.5, every_s=0.05)
    with pytest.raises(AssertionError, match="stopped without committing"):
        wait_for_commit_progress(lambda: next(same), {0: 40, 1: 12}, 30, running=lambda: False)
    back = iter([{0: 39, 1: 12}])
    with pytest.raises(AssertionError, match="moved back"):
        wait_for_commit_progress(lambda: next(back), {0: 40, 1: 12}, timeout_s=5)


def test_commit_progress_is_seen_once_an_offset_moves() -> None:
    readings = iter([{0: NO_COMMIT, 1: NO_COMMIT}, {0: NO_COMMIT, 1: NO_COMMIT}, {0: 8, 1: 0}])
    assert wait_for_commit_progress(lambda: next(readings), {}, 5, every_s=0.01) == {0: 8, 1: 0}
    assert commit_progress({0: 40, 1: 12}, {0: 41, 1: 12}) == 1
    assert commit_progress({}, {0: NO_COMMIT}) == 0
    assert commit_progress({0: 5}, {0: 4}) < 0


def test_the_table_has_a_column_for_every_count() -> None:
    report = check(good_run())
    header = FaultReport.header().splitlines()[0]
    assert "dup below commit" in header and "wrong event" in header and "unsent" in header
    assert report.row().count("|") == header.count("|")


@pytest.mark.kafka
def test_the_reader_reads_to_the_end_and_leaves_out_aborted_transactions(
    kafka_bootstrap: str, topic_factory: Callable[..., str]
) -> None:
    from confluent_kafka import Producer

    topic = topic_factory("reader", 2)
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": f"t-{uuid.uuid4()}"}
    )
    producer.init_transactions()
    producer.begin_transaction()
    for n in range(3):
        producer.produce(topic, value=f"kept-{n}".encode(), partition=n % 2)
    producer.commit_transaction()
    producer.begin_transaction()
    producer.produce(topic, value=b"aborted", partition=0)
    producer.flush()
    producer.abort_transaction()
    producer.begin_transaction()
    producer.produce(topic, value=b"open", partition=1)
    producer.flush()  # written, never committed
    with TopicReader(kafka_bootstrap, [topic]) as reader:
        values = sorted(r.value for r in reader.catch_up(timeout_s=30))
    assert values == [b"kept-0", b"kept-1", b"kept-2"]
    # The high watermarks count every record written, transaction markers included.
    assert sum(end_offsets(kafka_bootstrap, topic, 2).values()) > 3
    producer.abort_transaction()
