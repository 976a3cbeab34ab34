"""The checks that need no broker: the config itself, the model checkpoint, the health port."""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path

from consumer.config import ConfigError, WorkerSettings
from consumer.preflight.kafka_probe import client_setting
from consumer.preflight.results import CheckResult
from consumer.stream.kafka_io import consumer_config, producer_config

# --- 1. config -------------------------------------------------------------------------


def check_config(settings: WorkerSettings, config_file: Path | None = None) -> CheckResult:
    """The settings loaded; the worker's client configs can be built from them."""
    try:
        consumer_config(settings.kafka)
        producer_config(settings.kafka)
    except ConfigError as exc:  # an override of a setting the delivery guarantee needs
        return CheckResult("FAIL", "config", str(exc), "kafka.*_config")
    kafka = settings.kafka
    source = str(config_file) if config_file is not None else "no config file"
    protocol = client_setting(kafka, "security.protocol") or "PLAINTEXT"
    return CheckResult(
        "OK",
        "config",
        f"{source} + environment + flags; {kafka.processing_guarantee}, group "
        f"{kafka.group_id!r}, security.protocol={protocol}",
    )


# Folders a file:// root should never be: they hold the system's or users' secrets (keys,
# tokens, /proc/self/environ), not images. Only exact matches: /var/lib/frames is fine.
_BROAD_FOLDERS = frozenset(
    ("/", "/etc", "/proc", "/sys", "/dev", "/root", "/home", "/var", "/usr", "/run", "/boot")
)


def check_file_roots(settings: WorkerSettings) -> CheckResult | None:
    """A WARN when fetch.file_roots opens a system folder to every event; else None."""
    broad = [
        str(root)
        for root in settings.fetch.file_roots
        if os.path.realpath(root) in _BROAD_FOLDERS or str(root) in _BROAD_FOLDERS
    ]
    if not broad:
        return None
    return CheckResult(
        "WARN",
        "file-roots",
        f"fetch.file_roots includes {', '.join(broad)}: any event may then read the files "
        "there that the worker can (keys, tokens, /proc); list only the images' folders",
        "fetch.file_roots",
    )


# --- 6. model ----------------------------------------------------------------------------


def model_setting(message: str) -> str:
    """The model.* setting a ModelLoadError message is about."""
    if "model.device" in message:
        return "model.device"
    if "model.precision" in message:
        return "model.precision"
    if "merges with the end of model.prompt" in message:
        return "model.prompt"
    if "answer word" in message or "answer_words" in message or "labels" in message:
        return "model.labels / model.answer_words"
    if "model.prompt" in message:
        return "model.prompt"
    return "model.path"


def check_model(settings: WorkerSettings) -> CheckResult:
    """The worker's loader loads the checkpoint, the label tokens work, one forward runs."""
    try:
        from PIL import Image

        from consumer.engine import EmotionEngine

        started = time.perf_counter()
        engine = EmotionEngine.load(settings.model, max_batch_size=settings.batch.max_batch_size)
        loaded = time.perf_counter()
        # A grey face, resized and normalised like every face the worker will see.
        scores = engine.classify([Image.new("RGB", (224, 224), (128, 128, 128))])[0]
        forward_s = time.perf_counter() - loaded
    except ConfigError as exc:  # ModelLoadError names the path or setting and the fix
        return CheckResult("FAIL", "model", str(exc), model_setting(str(exc)))
    except Exception as exc:  # a forward that fails (out of memory, a broken checkpoint)
        return CheckResult(
            "FAIL",
            "model",
            f"model.path {settings.model.path}: {type(exc).__name__}: {exc}",
            f"model.path / model.device ({settings.model.device}) / model.dtype",
        )
    probabilities = list(scores.scores.values())
    if not all(math.isfinite(p) for p in probabilities) or abs(sum(probabilities) - 1) > 1e-6:
        return CheckResult(
            "FAIL",
            "model",
            f"the forward pass gave non-finite scores {probabilities} on {engine.device} "
            f"{str(engine.dtype).removeprefix('torch.')}",
            "model.dtype / model.path",
        )
    multi = sum(1 for seq in engine.label_sequences if len(seq) > 1)
    tokens = "each one token" if not multi else f"{multi} of several tokens (scored as sequences)"
    return CheckResult(
        "OK",
        "model",
        f"{engine.model_id} on {engine.device} {str(engine.dtype).removeprefix('torch.')}, "
        f"precision {engine.precision} ({engine.quantized_layers} quantized layers): "
        f"{len(engine.labels)} labels, {tokens}; load {loaded - started:.1f} s, one forward "
        f"{forward_s * 1000:.0f} ms",
    )


# --- 7. health port ----------------------------------------------------------------------


def check_health_port(settings: WorkerSettings) -> CheckResult:
    """The health server's port(s) can be bound right now."""
    health = settings.health
    if not health.enabled:
        return CheckResult("OK", "health-port", "health server disabled")
    if health.port == 0:
        return CheckResult("OK", "health-port", "port 0: any free port")
    devices = settings.processes.devices
    count = len(devices) if isinstance(devices, tuple) else 1
    ports = [health.port + i for i in range(count)]
    taken = []
    for port in ports:
        try:
            with socket.create_server((health.host, port)):
                pass
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            taken.append(f"{health.host}:{port} ({reason})")
    if taken:
        return CheckResult(
            "WARN",
            "health-port",
            f"cannot listen on {', '.join(taken)}: another process has it, or the host "
            "is not an address of this machine",
            "health.port / health.host",
        )
    shown = ", ".join(str(p) for p in ports)
    return CheckResult("OK", "health-port", f"{health.host}:{shown} free")
