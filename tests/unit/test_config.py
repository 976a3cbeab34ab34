"""Settings: file < environment < flags, and mistakes named with their fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.cli import build_parser, masked_settings, overrides_from_flags
from consumer.config import ConfigError, load_settings
from consumer.kafka_io import KafkaConfigError, consumer_config, producer_config


def test_defaults_are_valid() -> None:
    settings = load_settings()
    assert settings.kafka.input_topic == "frames"
    assert settings.model.labels[0] == "angry" and len(settings.model.labels) == 7


def test_file_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(
        '[kafka]\nbootstrap_servers = "file:9092"\ngroup_id = "from-file"\n'
        'input_topic = "file-topic"\n[batch]\nmax_batch_size = 4\n'
    )
    monkeypatch.setenv("EMOTION_WORKER_KAFKA__GROUP_ID", "from-env")
    monkeypatch.setenv("EMOTION_WORKER_KAFKA__INPUT_TOPIC", "env-topic")
    args = build_parser().parse_args(["run", "--input-topic", "flag-topic"])
    settings = load_settings(config, overrides_from_flags(args))
    assert settings.kafka.bootstrap_servers == "file:9092"
    assert settings.kafka.group_id == "from-env"
    assert settings.kafka.input_topic == "flag-topic"
    assert settings.batch.max_batch_size == 4


def test_librdkafka_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "EMOTION_WORKER_KAFKA__COMMON_CONFIG",
        '{"security.protocol": "SASL_SSL", "sasl.password": "hunter2"}',
    )
    settings = load_settings()
    assert consumer_config(settings.kafka)["security.protocol"] == "SASL_SSL"
    assert masked_settings(settings)["kafka"]["common_config"]["sasl.password"] == "***"


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"batch": {"max_batch_size": 0}}, "batch.max_batch_size"),
        ({"kafka": {"bootstrap": "x"}}, "kafka.bootstrap"),
        ({"model": {"device": "tpu"}}, "model.device"),
        ({"model": {"prompt": "no placeholder"}}, "<image>"),
        ({"model": {"answer_words": ["a", "b"]}}, "one word per label"),
        ({"flow": {"max_in_flight": 10, "resume_below": 10}}, "flow.resume_below"),
    ],
)
def test_mistakes_name_the_field(overrides: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_settings(overrides=overrides)


def test_bad_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[kafka\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)


def test_guarantee_settings_cannot_be_overridden() -> None:
    settings = load_settings(overrides={"kafka": {"consumer_config": {"enable.auto.commit": True}}})
    with pytest.raises(KafkaConfigError, match=r"enable\.auto\.commit"):
        consumer_config(settings.kafka)
    settings = load_settings(overrides={"kafka": {"producer_config": {"acks": "1"}}})
    with pytest.raises(KafkaConfigError, match="acks"):
        producer_config(settings.kafka)
    assert producer_config(load_settings().kafka)["enable.idempotence"] is True
