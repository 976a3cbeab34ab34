"""`emotion-worker check` without a broker: report lines, exit codes, secrets, model, port."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest

from consumer.cli import main
from consumer.config import load_settings
from consumer.preflight import (
    CheckResult,
    check_health_port,
    check_model,
    exit_code,
    format_result,
    model_setting,
    secret_values,
)

REPO = Path(__file__).resolve().parent.parent.parent


def test_format_names_the_setting_only_when_something_is_wrong() -> None:
    ok = format_result(CheckResult("OK", "brokers", "1 broker(s)", "kafka.bootstrap_servers"))
    assert ok.split() == ["OK", "brokers", "1", "broker(s)"]
    fail = format_result(CheckResult("FAIL", "input-topic", "missing", "kafka.input_topic"))
    assert fail.startswith("FAIL  input-topic") and fail.endswith("[fix: kafka.input_topic]")
    warn = format_result(CheckResult("WARN", "health-port", "taken", "health.port"))
    assert warn.startswith("WARN  health-port") and "[fix: health.port]" in warn


def test_format_masks_secret_values() -> None:
    settings = load_settings(
        None,
        {
            "kafka": {
                "common_config": {"sasl.username": "bob", "sasl.password": "hunter2-pw"},
                "producer_config": {"ssl.key.password": "key-pw-9"},
            }
        },
    )
    secrets = secret_values(settings.kafka)
    assert secrets == {"hunter2-pw", "key-pw-9"}
    line = format_result(
        CheckResult("FAIL", "brokers", "auth as bob with hunter2-pw and key-pw-9", "x"), secrets
    )
    assert "hunter2-pw" not in line and "key-pw-9" not in line and "bob" in line


@pytest.mark.parametrize(
    ("statuses", "code"),
    [
        ([("OK", "config"), ("WARN", "topics")], 0),
        ([("OK", "config"), ("FAIL", "model"), ("WARN", "health-port")], 1),
        ([("FAIL", "config")], 2),
    ],
)
def test_exit_code(statuses: list[tuple[str, str]], code: int) -> None:
    results = [CheckResult(status, name, "") for status, name in statuses]  # type: ignore[arg-type]
    assert exit_code(results) == code


def test_configuration_error_is_a_fail_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["check", "--max-batch-size", "0"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("FAIL  config") and "batch.max_batch_size" in out


def test_a_refused_librdkafka_override_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[kafka.producer_config]\nacks = "1"\n')
    assert main(["check", "--config", str(config), "--skip-model"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("FAIL  config") and "acks" in out


def test_unreachable_brokers_fail_within_the_timeout(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMOTION_WORKER_HEALTH__PORT", "0")
    started = time.monotonic()
    code = main(["check", "--bootstrap-servers", "127.0.0.1:1", "--timeout", "2", "--skip-model"])
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    assert code == 1, out
    assert elapsed < 10, elapsed
    brokers = next(line for line in out.splitlines() if line.split()[1] == "brokers")
    assert brokers.startswith("FAIL") and "127.0.0.1:1" in brokers and "refused" in brokers
    assert "[fix: kafka.bootstrap_servers" in brokers
    assert "not checked" in out  # the topic, group and producer checks are skipped


def test_bad_model_path_fails_naming_model_path(tmp_path: Path) -> None:
    settings = load_settings(None, {"model": {"path": str(tmp_path / "no-model")}})
    result = check_model(settings)
    assert result.status == "FAIL" and result.setting == "model.path"
    assert "does not exist" in result.detail


def test_cuda_without_a_gpu_fails_naming_model_device(tiny_checkpoint: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    settings = load_settings(None, {"model": {"path": str(tiny_checkpoint), "device": "cuda"}})
    result = check_model(settings)
    assert result.status == "FAIL" and result.setting == "model.device", result


def test_tiny_model_passes_with_device_and_dtype(tiny_checkpoint: Path) -> None:
    settings = load_settings(None, {"model": {"path": str(tiny_checkpoint), "device": "cpu"}})
    result = check_model(settings)
    assert result.status == "OK", result
    assert "on cpu float32" in result.detail and "7 labels, each one token" in result.detail
    assert "precision none (0 quantized layers)" in result.detail  # auto on a CPU


def test_label_token_errors_name_the_label_settings(tiny_checkpoint: Path) -> None:
    words = ["happy", "happy", "sad", "angry", "calm", "fear", "wow"]
    settings = load_settings(
        None, {"model": {"path": str(tiny_checkpoint), "device": "cpu", "answer_words": words}}
    )
    result = check_model(settings)
    assert result.status == "FAIL" and result.setting == "model.labels / model.answer_words"


@pytest.mark.parametrize(
    ("message", "setting"),
    [
        ("model.device is 'cuda' but no CUDA GPU is visible", "model.device"),
        ("answer word 'x' merges with the end of model.prompt when tokenized", "model.prompt"),
        ("answer word 'x' is unknown to the tokenizer", "model.labels / model.answer_words"),
        ('model.precision = "fp8" needs a CUDA GPU', "model.precision"),
        ("model.path /m has no config.json", "model.path"),
    ],
)
def test_model_errors_map_to_their_setting(message: str, setting: str) -> None:
    assert model_setting(message) == setting


def test_a_taken_health_port_is_a_warning() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        settings = load_settings(None, {"health": {"host": "127.0.0.1", "port": port}})
        result = check_health_port(settings)
    assert result.status == "WARN" and "health.port" in (result.setting or "")
    assert f"127.0.0.1:{port}" in result.detail
    assert check_health_port(settings).status == "OK"  # free again


def test_version_prints_package_and_library_versions_without_torch() -> None:
    code = (
        "import sys\n"
        "from consumer.cli import main\n"
        "try:\n"
        "    main(['--version'])\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    lines = proc.stdout.splitlines()
    assert lines[0] == f"emotion-worker {metadata.version('emotion-worker')}", proc.stdout
    assert f"confluent-kafka {metadata.version('confluent-kafka')} (librdkafka " in lines[1]
    assert f"torch {metadata.version('torch')}" in lines[1]
    assert f"transformers {metadata.version('transformers')}" in lines[1]
    assert lines[-1] == "exit 0 False", proc.stdout + proc.stderr


def test_check_help_has_the_run_flags_and_a_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    out = capsys.readouterr().out
    for flag in ("--config", "--bootstrap-servers", "--model-path", "--timeout", "--skip-model"):
        assert flag in out
