"""Kafka client errors: sorted by kind; throttled lines and an unreachable cluster said plainly."""

from __future__ import annotations

import json
import logging

import pytest
from confluent_kafka import KafkaError

from consumer.ops.metrics import HealthState
from consumer.stream.client_errors import (
    BrokerReachability,
    ClientErrors,
    ClientLogThrottle,
    ErrorKind,
    Throttle,
    any_broker_up,
    classify,
)

REFUSED = "127.0.0.1:1/bootstrap: Connect to ipv4#127.0.0.1:1 failed: Connection refused"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_one_line_per_kind_and_interval_with_the_count_held_back() -> None:
    clock = Clock()
    throttle = Throttle(interval_s=30.0, clock=clock)
    assert throttle.admit("_TRANSPORT") == 0
    assert throttle.admit("_ALL_BROKERS_DOWN") == 0  # another kind has its own allowance
    admitted = []
    for _ in range(500):  # 20 a second for 25 s, like librdkafka against a dead address
        clock.advance(0.05)
        admitted.append(throttle.admit("_TRANSPORT"))
    assert admitted == [None] * 500
    clock.advance(5.01)  # 30 s after the first line
    assert throttle.admit("_TRANSPORT") == 500
    assert throttle.admit("_TRANSPORT") is None
    clock.advance(30.0)
    assert throttle.admit("_TRANSPORT") == 1


def test_the_throttle_forgets_old_kinds() -> None:
    clock = Clock()
    throttle = Throttle(interval_s=10.0, clock=clock, max_kinds=4)
    for kind in range(4):
        assert throttle.admit(kind) == 0
    clock.advance(11.0)
    assert throttle.admit("new") == 0
    assert len(throttle._last) <= 4
    for kind in range(10):  # all within one interval: the oldest go
        assert throttle.admit(("burst", kind)) == 0
    assert len(throttle._last) <= 4


def _record(level: int, facility: str, client: str, message: str) -> logging.LogRecord:
    return logging.LogRecord(
        "librdkafka", level, __file__, 1, "%s [%s] %s", (facility, client, message), None
    )


def test_librdkafka_lines_are_throttled_per_kind_across_clients() -> None:
    clock = Clock()
    log_filter = ClientLogThrottle(Throttle(interval_s=30.0, clock=clock))
    line = f"[thrd:127.0.0.1:1/bootstrap]: {REFUSED} (after 0ms in state CONNECT)"
    first = _record(logging.ERROR, "FAIL", "rdkafka#consumer-1", line)
    assert log_filter.filter(first)
    assert first.getMessage() == f"FAIL [rdkafka#consumer-1] {line}"
    passed = 0
    for index in range(300):
        clock.advance(0.05)
        client = "rdkafka#producer-2" if index % 3 else "rdkafka#consumer-1"
        text = line.replace("after 0ms", f"after {index % 4}ms")
        passed += log_filter.filter(_record(logging.ERROR, "FAIL", client, text))
    assert passed == 0
    # Another facility is another kind.
    assert log_filter.filter(_record(logging.WARNING, "MAXPOLL", "rdkafka#consumer-1", "x"))
    clock.advance(30.0)
    later = _record(logging.ERROR, "FAIL", "rdkafka#consumer-1", line)
    assert log_filter.filter(later)
    assert later.getMessage().endswith("(300 similar line(s) suppressed since the last one)")
    assert REFUSED in later.getMessage()


def test_the_kafka_client_logger_carries_the_throttle() -> None:
    from consumer.stream.kafka_io import CLIENT_LOGGER

    assert any(isinstance(f, ClientLogThrottle) for f in CLIENT_LOGGER.filters)


def _reach(clock: Clock) -> BrokerReachability:
    return BrokerReachability(
        "127.0.0.1:1", report_after_s=10.0, repeat_every_s=60.0, quiet_s=15.0, clock=clock
    )


def test_an_unreachable_cluster_is_said_plainly_then_at_a_bounded_interval() -> None:
    clock = Clock()
    reach = _reach(clock)
    assert reach.problem() == "no Kafka broker reached yet (bootstrap servers 127.0.0.1:1)"
    lines = []
    for _ in range(2000):  # 100 s of 20 errors a second
        reach.failed(REFUSED)
        line = reach.check()
        if line is not None:
            lines.append((clock.now - 1000.0, line))
        clock.advance(0.05)
    assert [round(at) for at, _ in lines] == [10, 70]
    first = lines[0][1]
    assert first.startswith("cannot reach the bootstrap servers 127.0.0.1:1 for 10 s, ")
    assert f"last error: {REFUSED}" in first
    assert (
        "check kafka.bootstrap_servers" in first and "security.protocol / sasl.* / ssl.*" in first
    )
    assert lines[1][1].startswith("still cannot reach the bootstrap servers 127.0.0.1:1 for 70 s")
    problem = reach.problem()
    assert problem is not None and "cannot reach the Kafka bootstrap servers 127.0.0.1:1" in problem


def test_a_short_blip_is_not_an_outage() -> None:
    clock = Clock()
    reach = _reach(clock)
    assert reach.reached() is None  # first contact
    reach.failed("broker-1:9092/1: Disconnected")
    clock.advance(9.0)
    assert reach.check() is None
    clock.advance(20.0)  # no further errors: librdkafka reconnected
    assert reach.check() is None and reach.problem() is None
    # A later error starts a new outage clock rather than continuing the old one.
    reach.failed(REFUSED)
    clock.advance(5.0)
    reach.failed(REFUSED)
    assert reach.check() is None


def test_a_broker_reached_ends_the_outage_and_says_how_long_it_lasted() -> None:
    clock = Clock()
    reach = _reach(clock)
    reach.reached()
    for _ in range(30):
        reach.failed(REFUSED)
        clock.advance(1.0)
    assert reach.check() is not None
    assert reach.problem() is not None
    assert reach.reached() == pytest.approx(30.0)
    assert reach.problem() is None and reach.check() is None
    assert reach.reached() is None  # nothing was reported since


def test_broker_state_from_librdkafka_statistics() -> None:
    def stats(*states: str) -> str:
        brokers = {f"b{i}:9092/{i}": {"state": s, "nodeid": i} for i, s in enumerate(states)}
        return json.dumps({"brokers": brokers})

    assert any_broker_up(stats("DOWN", "UP"))
    assert not any_broker_up(stats("INIT", "CONNECT", "DOWN"))
    assert not any_broker_up("{}") and not any_broker_up("not json")


def test_readiness_waits_for_kafka() -> None:
    health = HealthState(loop_stall_s=1.0, stall_timeout_s=1.0)
    health.model_ready = health.subscribed = True
    health.kafka_problem = "no Kafka broker reached yet (bootstrap servers 127.0.0.1:1)"
    assert health.readiness() == (False, health.kafka_problem)
    health.kafka_problem = None
    assert health.readiness() == (True, "ready")


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (KafkaError(KafkaError._FENCED, "Producer fenced", fatal=True), ErrorKind.FATAL),
        (KafkaError(KafkaError.SASL_AUTHENTICATION_FAILED, "bad password"), ErrorKind.AUTH),
        (KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "no ACL"), ErrorKind.AUTH),
        (KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED, "no ACL"), ErrorKind.AUTH),
        (KafkaError(KafkaError._SSL, "certificate verify failed"), ErrorKind.AUTH),
        # An mTLS listener rejecting our certificate: a transport error with a TLS alert.
        (
            KafkaError(
                KafkaError._TRANSPORT, "SSL handshake failed: SSL/TLS alert bad certificate"
            ),
            ErrorKind.AUTH,
        ),
        (KafkaError(KafkaError._TRANSPORT, REFUSED), ErrorKind.UNREACHABLE),
        (KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"), ErrorKind.UNREACHABLE),
        (KafkaError(KafkaError._RESOLVE, "Failed to resolve 'kafka:9092'"), ErrorKind.UNREACHABLE),
        (KafkaError(KafkaError._MSG_TIMED_OUT, "Message timed out"), ErrorKind.RETRIABLE),
        (KafkaError(KafkaError.NOT_COORDINATOR, "not coordinator"), ErrorKind.RETRIABLE),
    ],
)
def test_client_errors_are_sorted_by_what_can_fix_them(error: KafkaError, kind: ErrorKind) -> None:
    assert classify(error) is kind


def test_fatal_and_auth_errors_fail_the_worker_the_rest_feed_reachability() -> None:
    failures: list[str] = []
    client = ClientErrors("127.0.0.1:1", failures.append)
    client.on_error(KafkaError(KafkaError._TRANSPORT, REFUSED))
    client.on_error(KafkaError(KafkaError._MSG_TIMED_OUT, "Message timed out"))
    assert failures == []
    assert client.reachability.problem() is not None  # not reached yet
    client.on_error(KafkaError(KafkaError.SASL_AUTHENTICATION_FAILED, "bad password"))
    assert len(failures) == 1 and "sasl.* / ssl.*" in failures[0]
    client.on_error(KafkaError(KafkaError._FENCED, "fenced", fatal=True))
    assert failures[1].startswith("fatal Kafka client error")
    client.on_consume_error(KafkaError(KafkaError._PARTITION_EOF, "end of partition"))
    assert len(failures) == 2  # the end of a partition is news, not trouble
    client.on_consume_error(KafkaError(KafkaError._FATAL, "fatal", fatal=True))
    assert failures[2].startswith("fatal consumer error")


def test_joining_the_group_counts_as_reaching_a_broker() -> None:
    client = ClientErrors("127.0.0.1:1", lambda _reason: None)
    asked: list[bool] = []

    def joined() -> bool:
        asked.append(True)
        return len(asked) >= 2

    assert client.check(joined) is not None  # no member id yet: not ready
    assert client.check(joined) is None  # a member id: the coordinator answered
    assert client.check(joined) is None and len(asked) == 2  # no need to ask again
