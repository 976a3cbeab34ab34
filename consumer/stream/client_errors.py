"""Kafka client trouble: sorted by what it means, said once and plainly.

librdkafka reports every failed connection attempt, as an error callback and as a log line
of its own: against a bootstrap address where nothing listens that is dozens of
"Connection refused" lines a second, and none of them says what to fix. Here:

* `classify` sorts an error: fatal, authentication/authorization (retrying cannot fix
  it), unreachable cluster, or retriable;
* `ClientErrors` is what the worker's clients report to (error_cb, consume errors,
  statistics): it stops the worker on fatal and auth errors and says the rest plainly;
* `Throttle` lets one line per kind (an error code, a librdkafka log line) through per
  interval, and counts the ones it holds back for the next line of that kind;
* `ClientLogThrottle` applies it to librdkafka's own log lines (the "librdkafka" logger);
* `BrokerReachability` turns persistent transport errors into one plain line naming the
  bootstrap servers and the settings to check, repeated at a bounded interval, and tells
  readiness whether a broker has been reached.
"""

from __future__ import annotations

import enum
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import structlog
from confluent_kafka import KafkaError

log = structlog.get_logger("consumer.stream.client_errors")

# One line per kind of client error or librdkafka log line per this many seconds.
ERROR_INTERVAL_S = 30.0
# Transport errors with no broker reached for this long make the cluster "unreachable"...
UNREACHABLE_AFTER_S = 5.0
# ...said again this often while it lasts...
REPEAT_EVERY_S = 30.0
# ...and over once this long passes without another error (librdkafka retries a connection
# at least every reconnect.backoff.max.ms, 10 s by default, and reports each failure).
QUIET_S = 15.0

SETTINGS_HINT = (
    "check kafka.bootstrap_servers and the security settings "
    "(kafka.common_config security.protocol / sasl.* / ssl.*)"
)

# Client errors that retrying cannot fix: bad credentials or missing ACLs.
AUTH_ERRORS = frozenset(
    {
        KafkaError._AUTHENTICATION,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.GROUP_AUTHORIZATION_FAILED,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError._SSL,  # TLS handshake: the broker's certificate cannot be verified
    }
)
# An mTLS listener that rejects our certificate shows up as a transport error, like a
# network outage; only the TLS alert in the text tells it apart.
TLS_ALERT = "ssl/tls alert"
# Client errors that mean no broker can be reached (at the moment).
UNREACHABLE_ERRORS = frozenset(
    {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE}
)


class ErrorKind(enum.Enum):
    FATAL = "fatal"  # the client cannot go on (e.g. a fenced idempotent producer)
    AUTH = "auth"  # credentials, ACLs or TLS: librdkafka would retry it forever
    UNREACHABLE = "unreachable"  # no broker answers; librdkafka keeps trying
    RETRIABLE = "retriable"  # anything else librdkafka recovers from by itself


def classify(error: KafkaError) -> ErrorKind:
    if error.fatal():
        return ErrorKind.FATAL
    code = error.code()
    if code in AUTH_ERRORS or (code == KafkaError._TRANSPORT and TLS_ALERT in error.str().lower()):
        return ErrorKind.AUTH
    if code in UNREACHABLE_ERRORS:
        return ErrorKind.UNREACHABLE
    return ErrorKind.RETRIABLE


class Throttle:
    """At most one line per kind and interval; counts the lines it holds back."""

    def __init__(
        self,
        interval_s: float = ERROR_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = 256,
    ) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._max_kinds = max_kinds
        self._lock = threading.Lock()
        self._last: dict[Hashable, float] = {}  # kind -> when its last line went out
        self._held: dict[Hashable, int] = {}  # kind -> lines held back since then

    def admit(self, kind: Hashable) -> int | None:
        """None: hold this line back. A count: log it, saying that many were held back."""
        with self._lock:
            now = self._clock()
            last = self._last.get(kind)
            if last is not None and now - last < self.interval_s:
                self._held[kind] = self._held.get(kind, 0) + 1
                return None
            self._last[kind] = now
            held = self._held.pop(kind, 0)
            if len(self._last) > self._max_kinds:
                self._forget(now)
            return held

    def _forget(self, now: float) -> None:
        """Drop kinds whose interval is over (and, if that is not enough, the oldest)."""
        for kind, last in list(self._last.items()):
            if now - last >= self.interval_s:
                del self._last[kind]
                self._held.pop(kind, None)
        while len(self._last) > self._max_kinds:
            oldest = min(self._last, key=self._last.__getitem__)
            del self._last[oldest]
            self._held.pop(oldest, None)


_NUMBERS = re.compile(r"\d+")


class ClientLogThrottle(logging.Filter):
    """A logging filter for librdkafka's lines: one per kind and interval, with a count.

    confluent-kafka logs `"%s [%s] %s" % (facility, client name, message)`. The kind is
    the level, the facility and the message with its numbers blanked, so the consumer's
    and the producer's "Connect to ... failed" are one kind, and "(after 0ms ...)" and
    "(after 3ms ...)" too.
    """

    def __init__(self, throttle: Throttle | None = None) -> None:
        super().__init__("librdkafka")
        self.throttle = throttle or Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 3:
            kind: Hashable = (record.levelno, str(args[0]), _NUMBERS.sub("#", str(args[2])))
        else:
            kind = (record.levelno, _NUMBERS.sub("#", str(record.msg)))
        held = self.throttle.admit(kind)
        if held is None:
            return False
        if held:
            record.msg = (
                f"{record.getMessage()} ({held} similar line(s) suppressed since the last one)"
            )
            record.args = ()
        return True


def any_broker_up(stats_json: str) -> bool:
    """Whether librdkafka's statistics show a connection to some broker that is up."""
    try:
        stats: dict[str, Any] = json.loads(stats_json)
        return any(b.get("state") == "UP" for b in stats.get("brokers", {}).values())
    except (ValueError, TypeError, AttributeError):
        return False


class BrokerReachability:
    """Whether the worker can reach its Kafka cluster, from the clients' errors and news.

    `failed()` for each transport-level error (connection refused, name not resolved,
    all brokers down); `reached()` on any sign of a live broker (statistics showing one
    up, a group member id, an assignment, a delivered message). `check()` from the poll
    loop returns the line to log when one is due.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        report_after_s: float = UNREACHABLE_AFTER_S,
        repeat_every_s: float = REPEAT_EVERY_S,
        quiet_s: float = QUIET_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.report_after_s = report_after_s
        self.repeat_every_s = repeat_every_s
        self.quiet_s = quiet_s
        self._clock = clock
        self._lock = threading.Lock()
        self.ever_reached = False
        self._failing_since: float | None = None
        self._last_failure = 0.0
        self._last_error = ""
        self._reported_at: float | None = None  # the last plain line of this outage

    def failed(self, error: str) -> None:
        with self._lock:
            now = self._clock()
            if self._failing_since is None or now - self._last_failure > self.quiet_s:
                self._failing_since = now  # a new outage, not the tail of an old one
                self._reported_at = None
            self._last_failure = now
            self._last_error = error

    def reached(self) -> float | None:
        """A broker answered. If that ends an outage that was reported: how long it lasted."""
        with self._lock:
            self.ever_reached = True
            since, reported = self._failing_since, self._reported_at
            self._failing_since = None
            self._reported_at = None
            if since is None or reported is None:
                return None
            return self._clock() - since

    def _unreachable_for(self, now: float) -> float | None:
        if self._failing_since is None or now - self._last_failure > self.quiet_s:
            return None
        lasted = now - self._failing_since
        return lasted if lasted >= self.report_after_s else None

    def check(self) -> str | None:
        """The plain line to log now, if one is due."""
        with self._lock:
            now = self._clock()
            lasted = self._unreachable_for(now)
            if lasted is None:
                return None
            if self._reported_at is not None and now - self._reported_at < self.repeat_every_s:
                return None
            again = "still " if self._reported_at is not None else ""
            self._reported_at = now
            return (
                f"{again}cannot reach the bootstrap servers {self.bootstrap_servers} for "
                f"{lasted:.0f} s, last error: {self._last_error}; {SETTINGS_HINT}"
            )

    def problem(self) -> str | None:
        """Why the worker is not ready as far as Kafka goes; None when it is."""
        with self._lock:
            lasted = self._unreachable_for(self._clock())
            if lasted is not None:
                return (
                    f"cannot reach the Kafka bootstrap servers {self.bootstrap_servers} for "
                    f"{lasted:.0f} s: {self._last_error}"
                )
            if not self.ever_reached:
                return f"no Kafka broker reached yet (bootstrap servers {self.bootstrap_servers})"
            return None


class ClientErrors:
    """Where the worker's Kafka clients report trouble and signs of life.

    Fatal and authentication errors call `fail` (librdkafka would retry wrong credentials
    forever while the worker looks alive and does nothing); transport errors feed the
    reachability tracker; everything is logged at most once per kind and interval.
    Called from librdkafka callbacks, which are served on the poll thread.
    """

    def __init__(self, bootstrap_servers: str, fail: Callable[[str], None]) -> None:
        self.bootstrap_servers = bootstrap_servers
        self._fail = fail
        self._throttle = Throttle()
        self.reachability = BrokerReachability(bootstrap_servers)

    def on_error(self, error: KafkaError) -> None:
        """The clients' error_cb."""
        kind = classify(error)
        if kind is ErrorKind.FATAL:
            self._fail(f"fatal Kafka client error: {error}")
        elif kind is ErrorKind.AUTH:
            self._fail(
                f"Kafka authentication or authorization failed: {error.str()}; check the "
                "sasl.* / ssl.* entries of kafka.common_config (or the topic and group ACLs)"
            )
        else:
            if kind is ErrorKind.UNREACHABLE:
                self.reachability.failed(error.str())
            # librdkafka retries these; each attempt that fails calls back again.
            suppressed = self._throttle.admit(error.code())
            if suppressed is not None:
                log.warning(
                    "kafka client error",
                    error=error.str(),
                    code=error.name(),
                    suppressed=suppressed,
                )

    def on_consume_error(self, error: KafkaError) -> None:
        """An error that `consume` returned in place of a message."""
        if error.fatal():
            self._fail(f"fatal consumer error: {error}")
        elif error.code() != KafkaError._PARTITION_EOF:
            suppressed = self._throttle.admit(("consume", error.code()))
            if suppressed is not None:
                log.warning("consumer error", error=str(error), suppressed=suppressed)

    def on_statistics(self, stats_json: str) -> None:
        if any_broker_up(stats_json):
            self.reached()

    def reached(self) -> None:
        """A broker answered (an assignment, a delivery, a member id, statistics)."""
        outage = self.reachability.reached()
        if outage is not None:
            log.info(
                "reached the Kafka brokers again",
                bootstrap_servers=self.bootstrap_servers,
                after_s=round(outage, 1),
            )

    def check(self, joined: Callable[[], bool]) -> str | None:
        """From the poll loop: log the unreachable line when due; the readiness problem.

        `joined` says whether the consumer has a group member id (asked only until a
        broker was first reached).
        """
        if not self.reachability.ever_reached and joined():
            self.reached()  # joined the group: the coordinator answered
        line = self.reachability.check()
        if line is not None:
            log.error(line, bootstrap_servers=self.bootstrap_servers)
        return self.reachability.problem()
