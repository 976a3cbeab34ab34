"""Worker settings: defaults < config file (TOML) < environment < command-line flags.

Environment variables use the prefix ``EMOTION_WORKER_`` and ``__`` between nested
names, for example ``EMOTION_WORKER_KAFKA__BOOTSTRAP_SERVERS=broker:9092`` or
``EMOTION_WORKER_MODEL__PATH=/models/llava-fer``. Tables merge key by key across the
sources: ``EMOTION_WORKER_KAFKA__COMMON_CONFIG='{"sasl.password": "..."}'`` adds the
password to the file's ``common_config`` and keeps its other keys.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

FER_LABELS: tuple[str, ...] = (
    "angry",
    "disgusted",
    "fearful",
    "happy",
    "neutral",
    "sad",
    "surprised",
)

# LLaVA-1.5's conversation format; `{labels}` is filled with the configured answer words.
DEFAULT_PROMPT = (
    "USER: <image>\nWhich emotion does this face show? Answer with one word: {labels}. ASSISTANT:"
)


# A DNS name: dot-separated labels of letters, digits and hyphens (a trailing dot is fine).
_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?)+")


class ConfigError(ValueError):
    """A setting a user gave is wrong; the message names the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    bootstrap_servers: str = "127.0.0.1:9092"
    group_id: str = "emotion-worker"
    input_topic: str = "frames"
    output_topic: str = "emotions"
    dead_letter_topic: str = "frames.dead-letter"
    # Any librdkafka setting, by its own dotted name (e.g. "security.protocol": "SASL_SSL").
    # `common` goes to both clients; the others override it for one client.
    common_config: dict[str, str | int | float | bool] = Field(default_factory=dict)
    consumer_config: dict[str, str | int | float | bool] = Field(default_factory=dict)
    producer_config: dict[str, str | int | float | bool] = Field(default_factory=dict)
    poll_timeout_s: float = Field(default=0.1, gt=0, le=5)
    # Done offsets are committed every commit_interval_s or every commit_every events,
    # whichever comes first, and always on revoke and on shutdown.
    commit_interval_s: float = Field(default=1.0, gt=0)
    commit_every: int = Field(default=1000, ge=1)
    # at_least_once: results, then offsets; duplicates only from the uncommitted window.
    # exactly_once: results and offsets in one Kafka transaction; read_committed readers
    # see each result once.
    processing_guarantee: Literal["at_least_once", "exactly_once"] = "at_least_once"
    # Static membership (Kubernetes: the pod name): a restart within session.timeout.ms
    # causes no rebalance, and in exactly_once mode it is the stable transactional id that
    # fences the previous incarnation.
    group_instance_id: str | None = Field(default=None, min_length=1, max_length=249)
    # How long a revoke waits for in-flight events of the revoked partitions to finish.
    revoke_timeout_s: float = Field(default=10.0, ge=0, le=300)


class ModelSettings(_Section):
    path: Path = Path(".cache/models/tiny-llava")
    # Names written into results, and the word the model answers for each (same order).
    labels: tuple[str, ...] = FER_LABELS
    answer_words: tuple[str, ...] | None = None
    prompt: str = DEFAULT_PROMPT
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    model_id: str | None = None  # written into results; defaults to the folder name
    # Where resize/crop/normalise run: "device" (batched torch ops on the model's device,
    # reproducing the checkpoint's preprocessor config) or "processor" (the checkpoint's
    # own Hugging Face image processor on the CPU, the reference).
    preprocess: Literal["device", "processor"] = "device"
    # torch.compile of the language model over batch-size buckets: "auto" compiles on
    # CUDA only; "on" forces it (slow to warm up on CPU); "off" never.
    compile: Literal["auto", "on", "off"] = "auto"
    # Weight-and-activation FP8 (e4m3, rowwise scales) for the language model's linear
    # layers; needs a GPU of compute capability 8.9+ (Hopper, Ada) and is off by default.
    fp8: bool = False

    @model_validator(mode="after")
    def _check_labels(self) -> ModelSettings:
        if len(self.labels) < 2:
            raise ValueError("model.labels needs at least two labels")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"model.labels has duplicates: {list(self.labels)}")
        if self.answer_words is not None and len(self.answer_words) != len(self.labels):
            raise ValueError(
                "model.answer_words must have one word per label "
                f"({len(self.labels)}), got {len(self.answer_words)}"
            )
        if "<image>" not in self.prompt:
            raise ValueError("model.prompt must contain the image placeholder <image>")
        return self

    @property
    def words(self) -> tuple[str, ...]:
        """The answer word of each label."""
        return self.answer_words or self.labels


class BatchSettings(_Section):
    max_batch_size: int = Field(default=16, ge=1, le=1024)
    max_wait_ms: float = Field(default=20.0, ge=0, le=10_000)


class S3Settings(_Section):
    # None: AWS's own endpoint for the region. For MinIO, Ceph or GCS interoperability,
    # the server's URL (e.g. "http://minio.storage:9000"). The endpoint is trusted
    # configuration, so the SSRF policy for event URLs does not apply to it.
    endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s/@]+(/.*)?$")
    # None: boto3's chain (AWS_REGION / AWS_DEFAULT_REGION, the profile, instance metadata).
    region: str | None = Field(default=None, min_length=1, max_length=64)
    # Leave all three unset to use boto3's credential chain: environment variables
    # (AWS_ACCESS_KEY_ID, ...), a web-identity token (EKS IRSA), the ECS or EC2 role.
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    # "path" (endpoint/bucket/key) is what most S3-compatible servers want; "virtual"
    # (bucket.endpoint/key) is AWS's default; "auto" lets boto3 choose.
    addressing_style: Literal["auto", "path", "virtual"] = "auto"

    @model_validator(mode="after")
    def _check_keys(self) -> S3Settings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError(
                "fetch.s3.access_key_id and fetch.s3.secret_access_key go together: "
                "set both, or neither to use the standard credential chain"
            )
        if self.session_token is not None and self.access_key_id is None:
            raise ValueError("fetch.s3.session_token needs fetch.s3.access_key_id too")
        return self


class FetchSettings(_Section):
    # Concurrent fetches (threads). Each holds at most one connection, so this also bounds
    # the open connections of the shared HTTP pool and the S3 client.
    threads: int = Field(default=8, ge=1, le=256)
    # The whole fetch of one image, redirects and body included.
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    # TCP (and TLS) connection set-up, per address tried.
    connect_timeout_s: float = Field(default=3.0, gt=0, le=60)
    # Longest silence while waiting for headers or body bytes. A server that keeps
    # trickling is still cut off by timeout_s.
    read_timeout_s: float = Field(default=5.0, gt=0, le=300)
    # Idle keep-alive connections kept for reuse, in all and per host.
    pool_max_idle: int = Field(default=32, ge=0, le=1024)
    pool_max_idle_per_host: int = Field(default=4, ge=0, le=256)
    max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(default=40_000_000, ge=1)
    # Retriable failures (timeouts, connection errors, 5xx) are tried this many extra times.
    retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.2, ge=0, le=30)
    # Redirects are followed by the worker itself, each hop checked like the first URL.
    max_redirects: int = Field(default=3, ge=0, le=20)
    # http(s) fetches refuse hosts that resolve to loopback, private, link-local (cloud
    # metadata), CGNAT, multicast or reserved addresses. Entries here are trusted anyway:
    # a hostname ("images.internal"), an address ("127.0.0.1") or a network ("10.0.0.0/8").
    allow_hosts: tuple[str, ...] = ()
    # None: file:// may read any path (for development and the demo). A tuple: only files
    # whose real path (symlinks and ".." resolved) lies under one of these folders.
    file_roots: tuple[Path, ...] | None = None
    # data: URIs carry the image in the event itself; the event-size cap
    # (flow.max_event_bytes) applies first, so the effective cap is the smaller one.
    max_data_uri_bytes: int = Field(default=1024 * 1024, ge=1)
    s3: S3Settings = S3Settings()

    @field_validator("allow_hosts")
    @classmethod
    def _check_allow_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip("[]"), strict=False)
            except ValueError:
                if not _HOSTNAME.fullmatch(entry):
                    raise ValueError(
                        f"fetch.allow_hosts entry {entry!r} is neither a hostname nor an "
                        "address or CIDR network (e.g. 'images.internal', '10.0.0.0/8')"
                    ) from None
        return value

    @field_validator("file_roots")
    @classmethod
    def _check_file_roots(cls, value: tuple[Path, ...] | None) -> tuple[Path, ...] | None:
        if value is not None:
            for root in value:
                if not root.is_absolute():
                    raise ValueError(f"fetch.file_roots entry {str(root)!r} must be absolute")
        return value


class DecodeSettings(_Section):
    # "process": decode, detect and crop in separate worker processes, so that a file that
    # crashes or hangs the decoder costs one dead letter, not the worker. "thread": in the
    # fetch threads (no isolation; for debugging and single-process profiling).
    isolation: Literal["process", "thread"] = "process"
    # Decoder processes; the fetch threads queue for them.
    workers: int = Field(default=2, ge=1, le=64)
    # Longest one image may take to decode, detect and crop before its process is killed.
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    # Address-space cap of each decoder process (MiB); a bomb that gets past the pixel
    # check fails with image_too_large instead of exhausting the pod's memory.
    max_memory_mb: int = Field(default=2048, ge=512)
    # A decoder process is replaced after this many images (bounds slow leaks).
    max_tasks_per_process: int = Field(default=1000, ge=1)


class FaceSettings(_Section):
    # Used when an event carries no boxes. "none": the whole image is one face (right for
    # pre-cropped, FER-style input). "haar": OpenCV's frontal-face Haar cascade, whose
    # weights ship inside the opencv-python-headless wheel.
    detector: Literal["none", "haar"] = "none"
    # Every box (the event's or the detector's) grows by this fraction of its width and
    # height on each side, then is clipped to the image: the classifier was trained on
    # crops with some forehead and chin.
    margin: float = Field(default=0.0, ge=0, le=1)
    # Detections smaller than this (pixels, shorter side) are ignored. 48 is FER's own
    # face size; below it there is little expression left to read, and starting the
    # cascade's search there saves ~40% of its time (bench/detector_bench.py).
    min_face_px: int = Field(default=48, ge=8, le=4096)
    # Detections beyond this many (largest first) are dropped.
    max_faces: int = Field(default=16, ge=1, le=64)
    # The crops of one event together (after the margin) may hold at most this many
    # pixels: 64 boxes over a whole frame would otherwise turn one small file into
    # hundreds of MB of crops. Over it, the event is image_too_large.
    max_crop_pixels: int = Field(default=16_000_000, ge=1)
    # Frames are shrunk so their longer side is at most this before detection (speed);
    # boxes are scaled back to full-resolution coordinates.
    detect_max_side: int = Field(default=960, ge=64, le=8192)
    # Haar cascade tuning: image pyramid step and how many overlapping hits make a face.
    haar_scale_factor: float = Field(default=1.1, gt=1.0, le=2.0)
    haar_min_neighbors: int = Field(default=5, ge=0, le=50)
    # Which of the wheel's frontal-face cascades: "alt2" (fewest false positives at the
    # same recall on the benchmark), "default" or "alt".
    haar_cascade: Literal["alt2", "default", "alt"] = "alt2"


class FlowSettings(_Section):
    # Above max_in_flight events (or max_in_flight_bytes of event payloads and decoded
    # faces) the partitions are paused; below resume_below events and half the bytes they
    # resume. Polling goes on meanwhile, so the worker stays in its group.
    max_in_flight: int = Field(default=256, ge=1)
    resume_below: int = Field(default=128, ge=0)
    max_in_flight_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    drain_timeout_s: float = Field(default=20.0, ge=0)
    max_event_bytes: int = Field(default=64 * 1024, ge=256)

    @model_validator(mode="after")
    def _check_marks(self) -> FlowSettings:
        if self.resume_below >= self.max_in_flight:
            raise ValueError(
                f"flow.resume_below ({self.resume_below}) must be lower than "
                f"flow.max_in_flight ({self.max_in_flight})"
            )
        return self


class HealthSettings(_Section):
    # One HTTP server for /metrics (Prometheus), /readyz and /livez.
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)  # 0: any free port (tests)
    # /livez fails when the poll loop has not turned for this long (it turns at least
    # every kafka.poll_timeout_s while healthy, also while paused)...
    loop_stall_s: float = Field(default=60.0, gt=0)
    # ...or when there is consumer lag but no input offset has advanced for this long:
    # a worker stuck without crashing must be restarted, not left "healthy".
    stall_timeout_s: float = Field(default=300.0, gt=0)
    # How often librdkafka reports statistics (consumer lag per partition).
    statistics_interval_s: float = Field(default=5.0, gt=0, le=600)


class ProcessSettings(_Section):
    # "single": this process is the worker. "auto": a supervisor starts one worker
    # process per visible CUDA GPU. A list ("cuda:0", "cuda:1", or "cpu" entries for
    # tests): one worker process per entry. All join the same consumer group; each is
    # pinned to its device (CUDA_VISIBLE_DEVICES) and serves health on health.port + i.
    devices: Literal["single", "auto"] | tuple[str, ...] = "single"

    @field_validator("devices")
    @classmethod
    def _check_devices(
        cls, value: Literal["single", "auto"] | tuple[str, ...]
    ) -> Literal["single", "auto"] | tuple[str, ...]:
        if isinstance(value, tuple):
            if not value:
                raise ValueError("processes.devices is an empty list; use 'single' or 'auto'")
            for device in value:
                if not re.fullmatch(r"cpu|cuda:\d+", device):
                    raise ValueError(
                        f"processes.devices entry {device!r} must be 'cpu' or 'cuda:<index>'"
                    )
        return value


class LogSettings(_Section):
    format: Literal["auto", "json", "console"] = "auto"
    level: Literal["debug", "info", "warning", "error"] = "info"


class WorkerSettings(BaseSettings):
    """Everything one worker process needs; see README's config reference."""

    model_config = SettingsConfigDict(
        env_prefix="EMOTION_WORKER_",
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
    health: HealthSettings = HealthSettings()
    processes: ProcessSettings = ProcessSettings()
    log: LogSettings = LogSettings()

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


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: the dotted field, what was wrong and what was given."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "(root)"
        given = err.get("input")
        # Error messages end up in logs: never echo a secret that was given.
        secret = any(_is_secret(str(part)) for part in err["loc"])
        shown = "'***'" if secret else repr(_redact(given))
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{source} {field}: {err['msg']} (got {shown})")
    return "; ".join(lines)


_SECRET_WORDS = ("secret", "password", "token", "access_key", "credential", "sasl.")


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def _redact(value: Any) -> Any:
    """`value` with the values of secret-looking keys (at any depth) masked."""
    if isinstance(value, dict):
        return {k: "***" if _is_secret(str(k)) else _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value
