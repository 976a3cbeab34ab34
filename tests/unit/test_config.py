"""Settings: file < environment < flags, and mistakes named with their fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.cli import build_parser, masked_settings, overrides_from_flags
from consumer.config import ConfigError, load_settings
from consumer.stream.kafka_io import KafkaConfigError, consumer_config, producer_config


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
        ({"faces": {"min_quality": 1.5}}, "faces.min_quality"),
        ({"faces": {"min_quality": -0.1}}, "faces.min_quality"),
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


# ---- tables merge key by key: flags > environment > config file > defaults -------------

_README_KAFKA = (
    "[kafka]\n"
    'common_config = { "security.protocol" = "SASL_SSL", "sasl.mechanism" = "SCRAM-SHA-512", '
    '"sasl.username" = "worker" }\n'
)


def test_readme_example_env_password_merges_into_the_file_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(_README_KAFKA)
    monkeypatch.setenv("EMOTION_WORKER_KAFKA__COMMON_CONFIG", '{"sasl.password": "hunter2"}')
    settings = load_settings(config)
    assert settings.kafka.common_config == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "worker",
        "sasl.password": "hunter2",
    }
    client = consumer_config(settings.kafka)
    assert client["security.protocol"] == "SASL_SSL" and client["sasl.password"] == "hunter2"


def test_one_variable_per_key_merges_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The Kubernetes overlay's form: one Secret key per variable.
    config = tmp_path / "worker.toml"
    config.write_text(_README_KAFKA)
    monkeypatch.setenv("EMOTION_WORKER_KAFKA__COMMON_CONFIG__sasl.password", "hunter2")
    common = load_settings(config).kafka.common_config
    assert common["sasl.password"] == "hunter2" and common["sasl.mechanism"] == "SCRAM-SHA-512"
    assert len(common) == 4


def test_tables_merge_at_every_level(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(
        '[kafka]\nbootstrap_servers = "file:9092"\ngroup_id = "file-group"\n'
        'input_topic = "file-topic"\n'
        '[kafka.common_config]\n"client.id" = "file"\n"socket.timeout.ms" = 1000\n'
        '"sasl.username" = "file-user"\n'
        "[fetch]\nthreads = 3\nretries = 1\n"
        '[fetch.s3]\nendpoint_url = "http://file:9000"\nregion = "file-region"\n'
        'addressing_style = "virtual"\n'
    )
    # The environment: a scalar, one table as JSON, one key of a nested table.
    monkeypatch.setenv("EMOTION_WORKER_KAFKA__GROUP_ID", "env-group")
    monkeypatch.setenv(
        "EMOTION_WORKER_KAFKA__COMMON_CONFIG",
        '{"socket.timeout.ms": 2000, "sasl.username": "env-user"}',
    )
    monkeypatch.setenv("EMOTION_WORKER_FETCH__RETRIES", "2")
    monkeypatch.setenv("EMOTION_WORKER_FETCH__S3__REGION", "env-region")
    monkeypatch.setenv("EMOTION_WORKER_FETCH__S3__ADDRESSING_STYLE", "auto")
    flags = {
        "kafka": {"input_topic": "flag-topic", "common_config": {"sasl.username": "flag-user"}},
        "fetch": {"s3": {"addressing_style": "path"}},
    }
    settings = load_settings(config, flags)
    kafka, fetch = settings.kafka, settings.fetch
    assert (kafka.bootstrap_servers, kafka.group_id, kafka.input_topic) == (
        "file:9092",
        "env-group",
        "flag-topic",
    )
    assert kafka.output_topic == "emotions"  # default
    assert kafka.common_config == {
        "client.id": "file",
        "socket.timeout.ms": 2000,
        "sasl.username": "flag-user",
    }
    assert (fetch.threads, fetch.retries, fetch.max_redirects) == (3, 2, 3)
    assert (fetch.s3.endpoint_url, fetch.s3.region, fetch.s3.addressing_style) == (
        "http://file:9000",
        "env-region",
        "path",
    )


def test_a_flag_overrides_one_key_of_a_file_table(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(_README_KAFKA + 'group_id = "file-group"\n')
    settings = load_settings(config, {"kafka": {"common_config": {"sasl.username": "flag"}}})
    assert settings.kafka.common_config == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "flag",
    }
    assert settings.kafka.group_id == "file-group"
    # A section given as a settings object overrides only the fields it sets.
    from consumer.config import BatchSettings

    config.write_text("[batch]\nmax_batch_size = 4\nmax_wait_ms = 7\n")
    batch = load_settings(config, {"batch": BatchSettings(max_wait_ms=9)}).batch
    assert (batch.max_batch_size, batch.max_wait_ms) == (4, 9)


def test_env_overrides_a_scalar_of_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text("[batch]\nmax_batch_size = 4\nmax_wait_ms = 7\n")
    monkeypatch.setenv("EMOTION_WORKER_BATCH__MAX_BATCH_SIZE", "8")
    batch = load_settings(config).batch
    assert (batch.max_batch_size, batch.max_wait_ms) == (8, 7)


def test_lists_replace_rather_than_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[fetch]\nallow_hosts = ["file.internal", "10.0.0.0/8"]\n')
    monkeypatch.setenv("EMOTION_WORKER_FETCH__ALLOW_HOSTS", '["env.internal"]')
    assert load_settings(config).fetch.allow_hosts == ("env.internal",)


def test_file_and_environment_mistakes_are_config_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="is not a file"):
        load_settings(tmp_path)
    config = tmp_path / "worker.toml"
    config.write_text("[batch]\nmax_batch_size = 0\n")
    with pytest.raises(ConfigError, match=r"batch\.max_batch_size"):
        load_settings(config)
    config.write_text(_README_KAFKA)
    monkeypatch.setenv("EMOTION_WORKER_KAFKA__COMMON_CONFIG", '{"sasl.password": hunter2')
    with pytest.raises(ConfigError, match="kafka") as info:
        load_settings(config)
    assert "hunter2" not in str(info.value)


# ---- model.precision, and model.fp8 (removed in 0.3.0) ---------------------------------


def test_precision_defaults_to_auto_and_accepts_bf16_as_no_quantization() -> None:
    assert load_settings().model.precision == "auto"
    for value in ("auto", "bf16", "none", "fp8", "int8"):
        assert load_settings(overrides={"model": {"precision": value}}).model.precision == value
    with pytest.raises(ConfigError, match=r"model\.precision"):
        load_settings(overrides={"model": {"precision": "fp16"}})


_FP8_REPLACED = (
    r'model\.fp8 was replaced by model\.precision in 0\.3\.0: .*model\.precision = "fp8"'
)


@pytest.mark.parametrize("value", ["true", "false"])
def test_the_removed_fp8_key_names_its_replacement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(f'[model]\npath = "/models/llava"\nfp8 = {value}\n')
    with pytest.raises(ConfigError, match=_FP8_REPLACED) as info:
        load_settings(config)
    assert '"bf16" (was fp8 = false' in str(info.value)  # both old values have their fix
    with pytest.raises(ConfigError, match=_FP8_REPLACED):
        load_settings(overrides={"model": {"fp8": value == "true"}})  # flags / overrides
    monkeypatch.setenv("EMOTION_WORKER_MODEL__FP8", value)
    with pytest.raises(ConfigError, match=_FP8_REPLACED):
        load_settings()
    with pytest.raises(ConfigError, match="EMOTION_WORKER_MODEL__FP8"):
        load_settings(overrides={"model": {"precision": "fp8"}})  # still there: still refused


def test_verify_whole_image_needs_the_whole_image_as_the_face() -> None:
    from consumer.config import FaceSettings

    assert FaceSettings(verify_whole_image=True).verify_whole_image
    with pytest.raises(ValueError, match=r"remove faces\.verify_whole_image"):
        FaceSettings(detector="haar", verify_whole_image=True)
