"""SASL and TLS settings reach the worker's Kafka clients; credentials never reach its log.

One broker of its own (`secure_broker`, conftest.py), with a SASL_PLAINTEXT listener
(SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN users), an SSL listener and an SSL listener that
requires a client certificate. Test tooling (topics, producing events, reading results
and offsets) uses its PLAINTEXT listener; only the worker goes through the secured ones.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deploy.kafka.local_broker import LocalKafkaBroker
from schemas import EmotionResult
from tests.integration.conftest import SASL_PASSWORD as PASSWORD
from tests.integration.conftest import SASL_USER as USER
from tests.support.events import event_bytes
from tests.support.kafka import NO_COMMIT, committed, end_offsets, produce, read
from tests.support.worker import WorkerProcess

pytestmark = pytest.mark.kafka

WRONG_PASSWORD = "not-the-Password-91c2"
EVENTS = 20
# A worker with wrong credentials must give up on its own within this (model load included).
FAIL_WITHIN_S = 90.0


@pytest.fixture(scope="module")
def kafka_bootstrap(secure_broker: LocalKafkaBroker) -> str:
    """Overrides the session broker here: topic_factory and start_worker use this one."""
    return secure_broker.bootstrap_servers


def _sasl(mechanism: str, password: str = PASSWORD, user: str = USER) -> dict[str, str]:
    return {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": mechanism,
        "sasl.username": user,
        "sasl.password": password,
    }


def _start(
    start_worker: Callable[..., WorkerProcess],
    topic_factory: Callable[..., str],
    plaintext: str,
    secured: str,
    common_config: dict[str, str],
    face_paths: list[Path],
) -> tuple[WorkerProcess, dict[str, str]]:
    """Publish EVENTS frames over `plaintext`, then start a worker on the `secured` listener."""
    topics = {
        "input_topic": topic_factory("frames"),
        "output_topic": topic_factory("emotions"),
        "dead_letter_topic": topic_factory("dead"),
    }
    topics["group_id"] = f"group-{topics['input_topic']}"
    produce(plaintext, topics["input_topic"], [event_bytes(p) for p in face_paths[:EVENTS]])
    worker = start_worker(
        kafka__bootstrap_servers=secured,
        kafka__common_config=json.dumps(common_config),
        **{f"kafka__{name}": value for name, value in topics.items()},
    )
    return worker, topics


def _logged_config(worker: WorkerProcess) -> dict[str, Any]:
    """kafka.common_config as the worker's start-up line shows it."""
    entry = next(e for e in worker.log_events() if e.get("event") == "effective config")
    config = entry["config"]
    assert isinstance(config, dict)
    common = config["kafka"]["common_config"]
    assert isinstance(common, dict)
    return common


def _assert_processed_everything(
    secure_broker: LocalKafkaBroker, worker: WorkerProcess, topics: dict[str, str]
) -> None:
    plain = secure_broker.bootstrap_servers
    records = read(plain, topics["output_topic"], expected=EVENTS, timeout_s=120, idle_s=1.0)
    assert worker.stop() == 0, worker.log_text()[-3000:]
    assert len(records) == EVENTS
    # With the worker stopped, the high watermarks are all it wrote: no duplicate result
    # arrived after the read, and nothing was dead-lettered.
    assert end_offsets(plain, topics["output_topic"], 1) == {0: EVENTS}
    assert end_offsets(plain, topics["dead_letter_topic"], 1) == {0: 0}
    results = [EmotionResult.model_validate_json(r.value) for r in records]
    assert all(r.status == "ok" and r.source.topic == topics["input_topic"] for r in results)
    assert sorted(r.source.offset for r in results) == list(range(EVENTS))
    assert committed(plain, topics["group_id"], topics["input_topic"], 1) == end_offsets(
        plain, topics["input_topic"], 1
    )


def _assert_wrote_nothing(plain: str, topics: dict[str, str]) -> None:
    """After the worker exited: no record in its output or dead-letter topic, no commit.

    High watermarks, not a read of a few seconds (which sees nothing while it is still
    being assigned): with the worker gone they are all it ever wrote.
    """
    assert end_offsets(plain, topics["output_topic"], 1) == {0: 0}
    assert end_offsets(plain, topics["dead_letter_topic"], 1) == {0: 0}
    assert committed(plain, topics["group_id"], topics["input_topic"], 1) == {0: NO_COMMIT}


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"])
def test_worker_processes_with_right_sasl_credentials(
    mechanism: str,
    secure_broker: LocalKafkaBroker,
    start_worker: Callable[..., WorkerProcess],
    topic_factory: Callable[..., str],
    face_paths: list[Path],
) -> None:
    worker, topics = _start(
        start_worker,
        topic_factory,
        secure_broker.bootstrap_servers,
        secure_broker.sasl_bootstrap_servers,
        _sasl(mechanism),
        face_paths,
    )
    _assert_processed_everything(secure_broker, worker, topics)
    log = worker.log_text()
    assert PASSWORD not in log
    assert _logged_config(worker)["sasl.password"] == "***"
    assert _logged_config(worker)["sasl.mechanism"] == mechanism  # the rest is shown


@pytest.mark.parametrize(
    ("mechanism", "user", "password"),
    [
        ("SCRAM-SHA-512", USER, WRONG_PASSWORD),
        ("PLAIN", USER, WRONG_PASSWORD),
        ("SCRAM-SHA-256", "nobody", WRONG_PASSWORD),
    ],
    ids=["scram-sha-512-wrong-password", "plain-wrong-password", "scram-sha-256-unknown-user"],
)
def test_worker_stops_with_wrong_sasl_credentials(
    mechanism: str,
    user: str,
    password: str,
    secure_broker: LocalKafkaBroker,
    start_worker: Callable[..., WorkerProcess],
    topic_factory: Callable[..., str],
    face_paths: list[Path],
) -> None:
    worker, topics = _start(
        start_worker,
        topic_factory,
        secure_broker.bootstrap_servers,
        secure_broker.sasl_bootstrap_servers,
        _sasl(mechanism, password, user),
        face_paths,
    )
    code = worker.proc.wait(FAIL_WITHIN_S)  # raises TimeoutExpired if it keeps retrying
    log = worker.log_text()
    assert code != 0, log[-3000:]
    failing = [e for e in worker.log_events() if e.get("event") == "worker failing"]
    assert failing, log[-3000:]
    reason = str(failing[0]["reason"]).lower()
    assert "authentication" in reason and "sasl" in reason, reason
    stopped = [e for e in worker.log_events() if e.get("event") == "worker stopped"]
    assert stopped and stopped[0]["consumed"] == 0 and stopped[0]["results"] == 0
    assert password not in log and PASSWORD not in log

    plain = secure_broker.bootstrap_servers
    _assert_wrote_nothing(plain, topics)


@pytest.mark.parametrize("client_certificate", [False, True], ids=["tls", "mtls"])
def test_worker_processes_over_tls(
    client_certificate: bool,
    secure_broker: LocalKafkaBroker,
    start_worker: Callable[..., WorkerProcess],
    topic_factory: Callable[..., str],
    face_paths: list[Path],
) -> None:
    files = secure_broker.tls_files
    config = {"security.protocol": "SSL", "ssl.ca.location": str(files.ca)}
    bootstrap = secure_broker.tls_bootstrap_servers
    if client_certificate:
        # The mTLS listener refuses clients without a certificate signed by the CA.
        bootstrap = secure_broker.mtls_bootstrap_servers
        config |= {
            "ssl.certificate.location": str(files.client_cert),
            "ssl.key.location": str(files.client_key),
            "ssl.key.password": files.client_key_password,
        }
    worker, topics = _start(
        start_worker, topic_factory, secure_broker.bootstrap_servers, bootstrap, config, face_paths
    )
    _assert_processed_everything(secure_broker, worker, topics)
    assert files.client_key_password not in worker.log_text()
    if client_certificate:
        assert _logged_config(worker)["ssl.key.password"] == "***"


@pytest.mark.parametrize("case", ["untrusted-broker", "mtls-without-certificate"])
def test_worker_stops_when_tls_cannot_be_established(
    case: str,
    secure_broker: LocalKafkaBroker,
    start_worker: Callable[..., WorkerProcess],
    topic_factory: Callable[..., str],
    face_paths: list[Path],
) -> None:
    files = secure_broker.tls_files
    if case == "untrusted-broker":  # a CA that did not sign the broker's certificate
        bootstrap = secure_broker.tls_bootstrap_servers
        config = {"security.protocol": "SSL", "ssl.ca.location": str(files.other_ca)}
    else:  # the mTLS listener refuses a client that shows no certificate
        bootstrap = secure_broker.mtls_bootstrap_servers
        config = {"security.protocol": "SSL", "ssl.ca.location": str(files.ca)}
    worker, topics = _start(
        start_worker,
        topic_factory,
        secure_broker.bootstrap_servers,
        bootstrap,
        config,
        face_paths,
    )
    worker.wait_for_log('"worker starting"', timeout_s=FAIL_WITHIN_S)
    code = worker.proc.wait(30)
    log = worker.log_text()
    assert code != 0, log[-3000:]
    failing = [e for e in worker.log_events() if e.get("event") == "worker failing"]
    assert failing and "ssl" in str(failing[0]["reason"]).lower(), log[-3000:]
    plain = secure_broker.bootstrap_servers
    _assert_wrote_nothing(plain, topics)
