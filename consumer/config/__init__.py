"""Worker settings: defaults < config file (TOML) < environment < command-line flags.

Environment variables use the prefix ``EMOTION_WORKER_`` and ``__`` between nested
names, for example ``EMOTION_WORKER_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or
``EMOTION_WORKER_MODEL__PATH=/models/llava-fer``. Tables merge key by key across the
sources: ``EMOTION_WORKER_KAFKA__COMMON_CONFIG='{"sasl.password": "..."}'`` adds the
password to the file's ``common_config`` and keeps its other keys.

One module per concern: ``settings`` (WorkerSettings, ENV_PREFIX, load_settings and the
config file source), ``errors`` (ConfigError and how validation errors are reported), one
module per group of sections (``kafka``, ``model`` with ``batch``, ``fetch`` with
``fetch.s3``, ``decode`` with ``faces``, ``flow``, ``dead_letter``, ``ops`` with
``health``, ``processes`` and ``log``, ``summarize``, ``dashboard``), and ``reference``,
which writes docs/configuration.md from them (``python -m consumer.config.reference``).
Import from the package: the modules are its layout, not its interface.
"""

# `reference` is deliberately not imported: it is a command, and importing it here would
# make `python -m consumer.config.reference` warn that the module was already imported.
from consumer.config.dashboard import DashboardSettings
from consumer.config.dead_letter import DeadLetterSettings
from consumer.config.decode import DecodeSettings, FaceSettings
from consumer.config.errors import ConfigError, describe_validation_error
from consumer.config.fetch import FetchSettings, S3Settings
from consumer.config.flags import FlagMap, flag_overrides
from consumer.config.flow import FlowSettings
from consumer.config.kafka import KafkaSettings
from consumer.config.model import DEFAULT_PROMPT, FER_LABELS, BatchSettings, ModelSettings
from consumer.config.ops import HealthSettings, LogSettings, ProcessSettings
from consumer.config.settings import ENV_PREFIX, WorkerSettings, load_settings
from consumer.config.summarize import SummarizeSettings

__all__ = [
    "DEFAULT_PROMPT",
    "ENV_PREFIX",
    "FER_LABELS",
    "BatchSettings",
    "ConfigError",
    "DashboardSettings",
    "DeadLetterSettings",
    "DecodeSettings",
    "FaceSettings",
    "FetchSettings",
    "FlagMap",
    "FlowSettings",
    "HealthSettings",
    "KafkaSettings",
    "LogSettings",
    "ModelSettings",
    "ProcessSettings",
    "S3Settings",
    "SummarizeSettings",
    "WorkerSettings",
    "describe_validation_error",
    "flag_overrides",
    "load_settings",
]
