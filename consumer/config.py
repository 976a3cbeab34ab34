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
    """Kafka: brokers, topics, librdkafka settings and how offsets are committed."""

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        description="Brokers to connect to first, as comma-separated `host:port` pairs.",
    )
    group_id: str = Field(
        default="emotion-worker", description="Consumer group that all workers join."
    )
    input_topic: str = Field(default="frames", description="Topic the frame events are read from.")
    output_topic: str = Field(
        default="emotions", description="Topic the results are written to, keyed by `stream_id`."
    )
    dead_letter_topic: str = Field(
        default="frames.dead-letter",
        description="Topic of the dead letters (events that failed), keyed by the input key.",
    )
    common_config: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description=(
            "Any librdkafka setting by its own dotted name (e.g. `security.protocol`: "
            "`SASL_SSL`), for both the consumer and the producer. `enable.auto.commit`, "
            "`enable.auto.offset.store`, `enable.idempotence` and `acks` are fixed by the "
            "worker and an override is refused."
        ),
    )
    consumer_config: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description=(
            "librdkafka settings for the consumer only; they override `kafka.common_config`."
        ),
    )
    producer_config: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description=(
            "librdkafka settings for the producer only; they override `kafka.common_config`."
        ),
    )
    poll_timeout_s: float = Field(
        default=0.1, gt=0, le=5, description="Longest wait in one poll, in seconds."
    )
    commit_interval_s: float = Field(
        default=1.0,
        gt=0,
        description=(
            "How often done offsets are committed, in seconds (or after `kafka.commit_every` "
            "events, whichever comes first; always on revoke and on shutdown)."
        ),
    )
    commit_every: int = Field(
        default=1000, ge=1, description="Also commit after this many finished events."
    )
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        default="at_least_once",
        description=(
            "`at_least_once`: results, then offsets; duplicates only from the uncommitted "
            "window. `exactly_once`: results and offsets in one Kafka transaction; "
            "`read_committed` readers see each result once (README: Delivery guarantees)."
        ),
    )
    # Static membership (Kubernetes: the pod name): a restart within session.timeout.ms
    # causes no rebalance, and in exactly_once mode it is the stable transactional id that
    # fences the previous incarnation.
    group_instance_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=249,
        description=(
            "Static membership id (Kubernetes: the pod name); in `exactly_once` mode it also "
            "names the transactional id. None: dynamic membership."
        ),
    )
    revoke_timeout_s: float = Field(
        default=10.0,
        ge=0,
        le=300,
        description=(
            "How long a revoke waits for in-flight events of the revoked partitions to "
            "finish, in seconds."
        ),
    )


class ModelSettings(_Section):
    """The LLaVA checkpoint, its labels and prompt, and how the model step runs."""

    path: Path = Field(
        default=Path(".cache/models/tiny-llava"),
        description="Local checkpoint folder in the Hugging Face layout (safetensors weights).",
    )
    labels: tuple[str, ...] = Field(
        default=FER_LABELS,
        description="Label names written into results: at least two, no duplicates.",
    )
    answer_words: tuple[str, ...] | None = Field(
        default=None,
        description=(
            "The word the model answers for each label, one per label in the same order. "
            "None: the labels themselves."
        ),
    )
    prompt: str = Field(
        default=DEFAULT_PROMPT,
        description=(
            "The prompt (LLaVA-1.5's conversation format); must contain the image "
            "placeholder `<image>`, and `{labels}` is filled with the answer words."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="`auto`: `cuda` when available, else `cpu`."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="`auto`: `bfloat16` on cuda, `float32` on cpu."
    )
    model_id: str | None = Field(
        default=None,
        description="Model name written into results. None: the checkpoint folder's name.",
    )
    preprocess: Literal["device", "processor"] = Field(
        default="device",
        description=(
            "Where resize/crop/normalise run: `device` (batched torch ops on the model's "
            "device, reproducing the checkpoint's preprocessor config) or `processor` (the "
            "checkpoint's own Hugging Face image processor on the CPU, the reference)."
        ),
    )
    compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "torch.compile of the language model over batch-size buckets: `auto` compiles "
            "on CUDA only; `on` forces it (slow to warm up on CPU); `off` never."
        ),
    )
    fp8: bool = Field(
        default=False,
        description=(
            "Weight-and-activation FP8 (e4m3, rowwise scales) for the language model's "
            "linear layers; needs a GPU of compute capability 8.9+ (Hopper, Ada)."
        ),
    )

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
    """Micro-batching of faces into forward passes."""

    max_batch_size: int = Field(
        default=16, ge=1, le=1024, description="Most faces in one forward pass."
    )
    max_wait_ms: float = Field(
        default=20.0,
        ge=0,
        le=10_000,
        description="Longest wait to fill a batch, in milliseconds.",
    )


class S3Settings(_Section):
    """The S3 client that reads `s3://` image references."""

    # The endpoint is trusted configuration, so the SSRF policy for event URLs does not
    # apply to it.
    endpoint_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/@]+(/.*)?$",
        description=(
            "URL of an S3-compatible server (MinIO, Ceph, GCS interoperability), e.g. "
            "`http://minio.storage:9000`; trusted, so not subject to the SSRF policy. "
            "None: AWS's own endpoint for the region."
        ),
    )
    region: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description=(
            "Region, e.g. `eu-west-1`. None: boto3's chain (`AWS_REGION` / "
            "`AWS_DEFAULT_REGION`, the profile, instance metadata)."
        ),
    )
    access_key_id: SecretStr | None = Field(
        default=None,
        description=(
            "Static access key id, set together with `fetch.s3.secret_access_key`. None "
            "(with the other two): boto3's credential chain: environment variables, a "
            "web-identity token (EKS IRSA), the ECS or EC2 role."
        ),
    )
    secret_access_key: SecretStr | None = Field(
        default=None,
        description="Static secret access key, set together with `fetch.s3.access_key_id`.",
    )
    session_token: SecretStr | None = Field(
        default=None,
        description="Session token of temporary credentials; needs `fetch.s3.access_key_id`.",
    )
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto",
        description=(
            "`path` (endpoint/bucket/key) is what most S3-compatible servers want; "
            "`virtual` (bucket.endpoint/key) is AWS's default; `auto` lets boto3 choose."
        ),
    )

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
    """Fetching images: threads, timeouts, connection reuse, size caps, retries, access."""

    # Each fetch holds at most one connection, so the thread count also bounds the open
    # connections of the shared HTTP pool and the S3 client.
    threads: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Concurrent image fetches (threads); also bounds the open connections.",
    )
    timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description=(
            "Total budget of one fetch attempt, in seconds: connection, redirects and body."
        ),
    )
    connect_timeout_s: float = Field(
        default=3.0,
        gt=0,
        le=60,
        description="TCP (and TLS) connection set-up, per address tried, in seconds.",
    )
    read_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description=(
            "Longest silence while waiting for headers or body bytes, in seconds; a server "
            "that keeps trickling is still cut off by `fetch.timeout_s`."
        ),
    )
    pool_max_idle: int = Field(
        default=32,
        ge=0,
        le=1024,
        description="Idle keep-alive HTTP(S) connections kept for reuse, in all.",
    )
    pool_max_idle_per_host: int = Field(
        default=4,
        ge=0,
        le=256,
        description="Idle keep-alive HTTP(S) connections kept for reuse, per host.",
    )
    max_bytes: int = Field(
        default=20 * 1024 * 1024,
        ge=1024,
        description="Image size cap in bytes, enforced while reading (default 20 MiB).",
    )
    max_pixels: int = Field(
        default=40_000_000,
        ge=1,
        description="Decompression-bomb cap: most pixels an image may have.",
    )
    retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description=(
            "Extra tries of retriable failures (timeouts, connection errors, 5xx responses)."
        ),
    )
    retry_backoff_s: float = Field(
        default=0.2,
        ge=0,
        le=30,
        description="Wait before the first retry, in seconds; it doubles for each next one.",
    )
    # Redirects are followed by the worker itself, so that each hop is checked like the first
    # URL.
    max_redirects: int = Field(
        default=3,
        ge=0,
        le=20,
        description="Redirects followed, each checked like the first URL.",
    )
    allow_hosts: tuple[str, ...] = Field(
        default=(),
        description=(
            "http(s) fetches refuse hosts that resolve to loopback, private, link-local "
            "(cloud metadata), CGNAT, multicast or reserved addresses; entries here are "
            'trusted anyway: a hostname (`"images.internal"`), an address (`"127.0.0.1"`) '
            'or a network (`"10.0.0.0/8"`).'
        ),
    )
    file_roots: tuple[Path, ...] | None = Field(
        default=None,
        description=(
            "Absolute folders that `file://` images must lie in (real path: symlinks and "
            "`..` resolved). None: any path (for development and the demo)."
        ),
    )
    max_data_uri_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        description=(
            "Decoded size cap of `data:` images in bytes (default 1 MiB); the event must "
            "also fit `flow.max_event_bytes`, so the effective cap is the smaller one."
        ),
    )
    s3: S3Settings = Field(
        default=S3Settings(), description="The S3 client for `s3://` images (`fetch.s3.*`)."
    )

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
    """Decoding, face detection and cropping of the fetched images."""

    # "process" isolates the decoder: a file that crashes or hangs it costs one dead
    # letter, not the worker.
    isolation: Literal["process", "thread"] = Field(
        default="process",
        description=(
            "`process`: decode, detect and crop in separate worker processes "
            "(crash-isolated). `thread`: in the fetch threads (no isolation; for debugging "
            "and single-process profiling)."
        ),
    )
    workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Decoder processes; the fetch threads queue for them.",
    )
    timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description=(
            "Longest one image may take to decode, detect and crop before its process is "
            "killed, in seconds."
        ),
    )
    # A bomb that gets past the pixel check fails with image_too_large instead of
    # exhausting the pod's memory.
    max_memory_mb: int = Field(
        default=2048,
        ge=512,
        description="Address-space cap of each decoder process, in MiB.",
    )
    # Replacing decoder processes bounds slow leaks.
    max_tasks_per_process: int = Field(
        default=1000,
        ge=1,
        description="Images a decoder process handles before it is replaced.",
    )


class FaceSettings(_Section):
    """Finding the faces in a frame and cropping them."""

    # The Haar cascade's weights ship inside the opencv-python-headless wheel.
    detector: Literal["none", "haar"] = Field(
        default="none",
        description=(
            "Used when an event carries no boxes. `none`: the whole image is one face (right "
            "for pre-cropped, FER-style input). `haar`: OpenCV's frontal-face Haar cascade."
        ),
    )
    # The classifier was trained on crops with some forehead and chin.
    margin: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description=(
            "Every box (the event's or the detector's) grows by this fraction of its width "
            "and height on each side, then is clipped to the image."
        ),
    )
    # 48 is FER's own face size; below it there is little expression left to read, and
    # starting the cascade's search there saves ~40% of its time (bench/detector_bench.py).
    min_face_px: int = Field(
        default=48,
        ge=8,
        le=4096,
        description="Detections smaller than this (pixels, shorter side) are ignored.",
    )
    max_faces: int = Field(
        default=16,
        ge=1,
        le=64,
        description="Most faces per frame; detections beyond it (largest first) are dropped.",
    )
    # 64 boxes over a whole frame would otherwise turn one small file into hundreds of MB
    # of crops.
    max_crop_pixels: int = Field(
        default=16_000_000,
        ge=1,
        description=(
            "Pixels of all of one event's crops together (after the margin); over it the "
            "event is `image_too_large`."
        ),
    )
    # Shrinking before detection is for speed.
    detect_max_side: int = Field(
        default=960,
        ge=64,
        le=8192,
        description=(
            "Frames are shrunk so their longer side is at most this (pixels) before "
            "detection; boxes are scaled back to full-resolution coordinates."
        ),
    )
    haar_scale_factor: float = Field(
        default=1.1,
        gt=1.0,
        le=2.0,
        description="Haar cascade tuning: the image pyramid's step.",
    )
    haar_min_neighbors: int = Field(
        default=5,
        ge=0,
        le=50,
        description="Haar cascade tuning: how many overlapping hits make a face.",
    )
    # alt2 has the fewest false positives at the same recall on the benchmark.
    haar_cascade: Literal["alt2", "default", "alt"] = Field(
        default="alt2",
        description="Which of the OpenCV wheel's frontal-face Haar cascades is used.",
    )


class FlowSettings(_Section):
    """Back-pressure (how much work may be in flight) and graceful shutdown."""

    # Polling goes on while the partitions are paused, so the worker stays in its group.
    max_in_flight: int = Field(
        default=256,
        ge=1,
        description="The partitions are paused above this many events in flight.",
    )
    resume_below: int = Field(
        default=128,
        ge=0,
        description=(
            "Paused partitions resume below this many events in flight (and below half of "
            "`flow.max_in_flight_bytes`); must be lower than `flow.max_in_flight`."
        ),
    )
    max_in_flight_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description=(
            "The partitions are also paused above this many bytes of event payloads and "
            "decoded faces in flight (default 256 MiB)."
        ),
    )
    drain_timeout_s: float = Field(
        default=20.0,
        ge=0,
        description=(
            "Graceful shutdown budget: how long in-flight events may take to finish, in seconds."
        ),
    )
    max_event_bytes: int = Field(
        default=64 * 1024,
        ge=256,
        description="Larger events (in bytes) are dead letters (default 64 KiB).",
    )

    @model_validator(mode="after")
    def _check_marks(self) -> FlowSettings:
        if self.resume_below >= self.max_in_flight:
            raise ValueError(
                f"flow.resume_below ({self.resume_below}) must be lower than "
                f"flow.max_in_flight ({self.max_in_flight})"
            )
        return self


class HealthSettings(_Section):
    """The HTTP server for metrics and probes, and when the liveness probe fails."""

    enabled: bool = Field(
        default=True,
        description="Run one HTTP server for `/metrics` (Prometheus), `/readyz` and `/livez`.",
    )
    host: str = Field(default="0.0.0.0", description="Address the HTTP server listens on.")
    port: int = Field(
        default=8080,
        ge=0,
        le=65535,
        description=(
            "Port of the HTTP server; 0: any free port (tests). Worker process i of several "
            "(`processes.devices`) uses port + i."
        ),
    )
    # The poll loop turns at least every kafka.poll_timeout_s while healthy, also while
    # paused.
    loop_stall_s: float = Field(
        default=60.0,
        gt=0,
        description="`/livez` fails when the poll loop has not turned for this long, in seconds.",
    )
    # A worker stuck without crashing must be restarted, not left "healthy".
    stall_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description=(
            "`/livez` also fails when there is consumer lag but no input offset has advanced "
            "for this long, in seconds."
        ),
    )
    statistics_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description=(
            "How often librdkafka reports statistics (consumer lag per partition), in seconds."
        ),
    )


class ProcessSettings(_Section):
    """How many worker processes run, and on which devices."""

    devices: Literal["single", "auto"] | tuple[str, ...] = Field(
        default="single",
        description=(
            "`single`: this process is the worker. `auto`: a supervisor starts one worker "
            'process per visible CUDA GPU. A list (`["cuda:0", "cuda:1"]`, or `"cpu"` '
            "entries for tests): one worker process per entry. All join the same consumer "
            "group; each is pinned to its device (`CUDA_VISIBLE_DEVICES`) and serves health "
            "on `health.port` + i."
        ),
    )

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
    """Log output."""

    format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description=(
            "`json`: one JSON object per line. `console`: human-readable. `auto`: `json` when "
            "stderr is not a terminal, else `console`."
        ),
    )
    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="The lowest level that is logged."
    )


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
