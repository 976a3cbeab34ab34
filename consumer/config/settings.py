"""The top-level settings, WorkerSettings, and load_settings, which builds them from the
flags, the environment and the TOML config file.

WorkerSettings and load_settings share a module because they share the precedence: the order of
the sources is declared by WorkerSettings (settings_customise_sources) and the config file
of one load_settings call reaches it through the context variable below.
"""

from __future__ import annotations

import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from consumer.config.dashboard import DashboardSettings
from consumer.config.dead_letter import DeadLetterSettings
from consumer.config.decode import DecodeSettings, FaceSettings
from consumer.config.errors import ConfigError, describe_validation_error
from consumer.config.fetch import FetchSettings
from consumer.config.flow import FlowSettings
from consumer.config.kafka import KafkaSettings
from consumer.config.model import BatchSettings, ModelSettings
from consumer.config.ops import HealthSettings, LogSettings, ProcessSettings
from consumer.config.summarize import SummarizeSettings

# Every setting's environment variable starts with this (EMOTION_WORKER_KAFKA__GROUP_ID).
ENV_PREFIX = "EMOTION_WORKER_"


class WorkerSettings(BaseSettings):
    """Everything one worker process needs; every setting is in docs/configuration.md."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    kafka: KafkaSettings = KafkaSettings()
    model: ModelSettings = ModelSettings()
    batch: BatchSettings = BatchSettings()
    fetch: FetchSettings = FetchSettings()
    decode: DecodeSettings = DecodeSettings()
    faces: FaceSettings = FaceSettings()
    flow: FlowSettings = FlowSettings()
    dead_letter: DeadLetterSettings = DeadLetterSettings()
    health: HealthSettings = HealthSettings()
    processes: ProcessSettings = ProcessSettings()
    log: LogSettings = LogSettings()
    summarize: SummarizeSettings = SummarizeSettings()
    dashboard: DashboardSettings = DashboardSettings()

    @field_validator("kafka", mode="before")
    @classmethod
    def _no_none(cls, value: Any) -> Any:
        return {} if value is None else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: flags (init) > environment > config file (> field defaults, which
        # pydantic-settings appends). pydantic-settings merges the sources' dicts with
        # pydantic's deep_update, table by table and key by key: a table from the
        # environment (JSON, or one key per `__` variable) adds to and overrides keys of the
        # file's table of the same name instead of replacing it. Lists and scalars replace.
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        config_file = _CONFIG_FILE.get()
        if config_file is not None:
            sources += (_ConfigFileSource(settings_cls, config_file),)
        return sources


# The TOML file of the load_settings call in progress (None: no file).
_CONFIG_FILE: ContextVar[Path | None] = ContextVar("emotion_worker_config_file", default=None)


class _ConfigFileSource(TomlConfigSettingsSource):
    """pydantic-settings' TOML source, with read errors that name the file and the fix."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        # The library skips a missing file silently; a path the user gave must exist.
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist; fix the path")
        if not path.is_file():
            raise ConfigError(f"config file {path} is not a file; fix the path")
        super().__init__(settings_cls, toml_file=path)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            return super()._read_file(file_path)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file_path} is not valid TOML: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {file_path} is not UTF-8 text: {exc}") from exc
        except OSError as exc:
            raise ConfigError(f"config file {file_path} cannot be read: {exc.strerror}") from exc


def _plain_tables(value: Any) -> Any:
    """`value` with settings objects turned into tables of the fields that were set.

    deep_update merges only dicts: a section given as a model instance (e.g.
    `{"fetch": FetchSettings(...)}`) would replace the file's and the environment's whole
    table instead of overriding the keys it sets.
    """
    if isinstance(value, BaseModel):
        value = value.model_dump(exclude_unset=True)
    if isinstance(value, dict):
        return {key: _plain_tables(item) for key, item in value.items()}
    return value


def load_settings(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> WorkerSettings:
    """Build the settings; raise ConfigError naming the field and the fix on any mistake.

    Precedence, table by table and key by key: `overrides` (the command-line flags) >
    environment > `config_file` (TOML) > defaults.
    """
    token = _CONFIG_FILE.set(None if config_file is None else Path(config_file))
    try:
        return WorkerSettings(**_plain_tables(overrides or {}))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source="setting")) from exc
    except SettingsError as exc:
        # e.g. an EMOTION_WORKER_ table variable that is not JSON; the message names the
        # field and the source, never the value.
        raise ConfigError(
            f"{exc}; tables in the environment are JSON, e.g. "
            """EMOTION_WORKER_KAFKA__COMMON_CONFIG='{"sasl.password": "..."}'"""
        ) from exc
    finally:
        _CONFIG_FILE.reset(token)
