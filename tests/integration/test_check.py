"""`emotion-worker check` against a real broker: all OK, missing topics, SASL, exactly-once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from consumer.cli import main
from consumer.stream.kafka_io import ensure_topics
from deploy.kafka.local_broker import LocalKafkaBroker
from tests.integration.conftest import SASL_PASSWORD, SASL_USER

pytestmark = pytest.mark.kafka

REPO = Path(__file__).resolve().parent.parent.parent
WRONG_PASSWORD = "not-the-Password-4e1b"
ALL_CHECKS = [
    "config",
    "brokers",
    "input-topic",
    "output-topic",
    "dead-letter-topic",
    "group-read",
    "producer-write",
    "model",
    "health-port",
]


def _topics(bootstrap: str, partitions: int = 2) -> dict[str, str]:
    """Fresh input, output and dead-letter topics on `bootstrap`, by setting name."""
    run = uuid.uuid4().hex[:10]
    topics = {
        "input_topic": f"check-frames-{run}",
        "output_topic": f"check-emotions-{run}",
        "dead_letter_topic": f"check-dead-{run}",
    }
    ensure_topics(bootstrap, topics.values(), partitions=partitions)
    return topics


def _flags(bootstrap: str, topics: dict[str, str]) -> list[str]:
    flags = ["--bootstrap-servers", bootstrap, "--group-id", f"group-{topics['input_topic']}"]
    for name, topic in topics.items():
        flags += [f"--{name.replace('_', '-')}", topic]
    return flags


def _run_cli(args: list[str], env: dict[str, str], timeout_s: float = 300) -> tuple[int, str]:
    """`python -m consumer.cli check ...` as a process: (exit code, stdout + stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", "consumer.cli", "check", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )
    return proc.returncode, proc.stdout + proc.stderr


def _lines(output: str) -> dict[str, str]:
    """check name -> its line, for the report lines of the output."""
    lines = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in ("OK", "WARN", "FAIL"):
            lines[parts[1]] = line
    return lines


def test_all_checks_pass_against_a_ready_cluster(
    kafka_bootstrap: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    topics = _topics(kafka_bootstrap)
    config = tmp_path / "worker.toml"
    config.write_text(
        "[kafka]\n"
        f'bootstrap_servers = "{kafka_bootstrap}"\n'
        + "".join(f'{name} = "{topic}"\n' for name, topic in topics.items())
        + '\n[health]\nhost = "127.0.0.1"\nport = 0\n'
    )
    code, output = _run_cli(["--config", str(config), "--model-path", str(tiny_checkpoint)], env={})
    assert code == 0, output
    lines = _lines(output)
    assert list(lines) == ALL_CHECKS, output
    assert all(line.startswith("OK") for line in lines.values()), output
    assert "2 partition(s)" in lines["input-topic"]
    assert "cleanup.policy=delete" in lines["output-topic"]
    assert "committed offsets on 0/2" in lines["group-read"]
    assert "on cpu float32" in lines["model"] and "7 labels" in lines["model"]


def test_missing_topic_fails_naming_the_setting(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str]
) -> None:
    topics = _topics(kafka_bootstrap)
    missing = f"no-such-topic-{uuid.uuid4().hex[:8]}"
    topics["dead_letter_topic"] = missing
    assert main(["check", *_flags(kafka_bootstrap, topics), "--skip-model"]) == 1
    lines = _lines(capsys.readouterr().out)
    line = lines["dead-letter-topic"]
    assert line.startswith("FAIL") and missing in line and "does not exist" in line, line
    assert "[fix: kafka.dead_letter_topic]" in line
    assert lines["input-topic"].startswith("OK") and lines["group-read"].startswith("OK")


def test_exactly_once_inits_a_throw_away_transaction(
    kafka_bootstrap: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    topics = _topics(kafka_bootstrap, partitions=1)
    monkeypatch.setenv("EMOTION_WORKER_KAFKA__PROCESSING_GUARANTEE", "exactly_once")
    monkeypatch.setenv("EMOTION_WORKER_KAFKA__GROUP_INSTANCE_ID", "pod-0")
    monkeypatch.setenv("EMOTION_WORKER_HEALTH__PORT", "0")
    assert main(["check", *_flags(kafka_bootstrap, topics), "--skip-model"]) == 0
    out = capsys.readouterr().out
    line = _lines(out)["producer-write"]
    group = f"group-{topics['input_topic']}"
    assert line.startswith("OK") and "init_transactions OK" in line, out
    assert f"'{group}-pod-0-check'" in line  # never the worker's own id: no fencing


def test_sasl_right_password_passes_and_is_never_printed(
    secure_broker: LocalKafkaBroker,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topics = _topics(secure_broker.bootstrap_servers, partitions=1)
    common = {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": SASL_USER,
        "sasl.password": SASL_PASSWORD,
    }
    monkeypatch.setenv("EMOTION_WORKER_KAFKA__COMMON_CONFIG", json.dumps(common))
    monkeypatch.setenv("EMOTION_WORKER_HEALTH__PORT", "0")
    code = main(["check", *_flags(secure_broker.sasl_bootstrap_servers, topics), "--skip-model"])
    output = capsys.readouterr()
    assert code == 0, output.out
    assert "SASL_PLAINTEXT SCRAM-SHA-256" in _lines(output.out)["brokers"]
    assert SASL_PASSWORD not in output.out + output.err


def test_sasl_wrong_password_fails_fast_naming_the_sasl_settings(
    secure_broker: LocalKafkaBroker,
) -> None:
    topics = _topics(secure_broker.bootstrap_servers, partitions=1)
    common = {
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": SASL_USER,
        "sasl.password": WRONG_PASSWORD,
    }
    started = time.monotonic()
    code, output = _run_cli(
        [*_flags(secure_broker.sasl_bootstrap_servers, topics), "--skip-model", "--timeout", "10"],
        env={
            "EMOTION_WORKER_KAFKA__COMMON_CONFIG": json.dumps(common),
            "EMOTION_WORKER_HEALTH__PORT": "0",
        },
        timeout_s=60,
    )
    assert code == 1, output
    assert time.monotonic() - started < 30  # an authentication error ends the wait early
    line = _lines(output)["brokers"]
    assert line.startswith("FAIL") and "authentication" in line.lower(), output
    assert '"sasl.username"' in line and '"sasl.password"' in line
    assert WRONG_PASSWORD not in output and SASL_PASSWORD not in output
    assert not any(
        line.startswith("OK") for name, line in _lines(output).items() if "topic" in name
    )
