"""What each supervised worker process is started with: its command line and environment.

Each child is `python -m consumer.cli run [--config FILE]` with the parent's environment
plus a few variables that make it a single worker pinned to its device:

* ``EMOTION_WORKER_PROCESSES__DEVICES=single``: the child is a worker, not a supervisor.
* ``CUDA_VISIBLE_DEVICES``: the one GPU it may see (empty for "cpu": it sees none), and
  ``EMOTION_WORKER_MODEL__DEVICE`` = "cuda" or "cpu".
* ``EMOTION_WORKER_HEALTH__PORT``: health.port + index (0 stays 0: any free port).
* ``EMOTION_WORKER_KAFKA__GROUP_INSTANCE_ID``: "<id>-<index>" when one is configured;
  static members (and exactly_once transactional ids) must be unique per process.
* ``EMOTION_WORKER_PROCESS_INDEX``: the child's index, for its logs (a process label).

Command-line flags given to the supervisor reach the children as environment variables:
flags beat the environment and the file, and in the child an environment variable beats
the file too, so the effective settings are the same, except that the device cannot be
overridden per child by a flag (`--device` would beat the pinning above).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consumer.config import ENV_PREFIX, ConfigError, WorkerSettings
from consumer.ops.logs import PROCESS_INDEX_ENV
from consumer.ops.placement import Placement, count_gpus, resolve_devices


@dataclass(frozen=True)
class ChildSpec:
    """A child process to start: its placement, command line and complete environment."""

    placement: Placement
    argv: list[str]
    env: dict[str, str]


def _env_value(value: Any) -> str:
    """How pydantic-settings reads a value back from the environment."""
    if isinstance(value, bool | list | tuple | dict):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return str(value)


def flags_as_env(overrides: Mapping[str, Any], prefix: str = ENV_PREFIX) -> dict[str, str]:
    """The nested flag overrides as EMOTION_WORKER_SECTION__FIELD variables."""
    env: dict[str, str] = {}
    for key, value in overrides.items():
        name = f"{prefix}{key.upper()}"
        if isinstance(value, Mapping):
            env.update(flags_as_env(value, f"{name}__"))
        else:
            env[name] = _env_value(value)
    return env


def _set(env: dict[str, str], name: str, value: str) -> None:
    """Set `name`, dropping other spellings: settings read the environment case-blind."""
    for existing in [k for k in env if k.upper() == name.upper()]:
        del env[existing]
    env[name] = value


def child_argv(config_file: Path | None, python: str = sys.executable) -> list[str]:
    """The child's command line: the same config file, no flags (they go by environment)."""
    argv = [python, "-m", "consumer.cli", "run"]
    if config_file is not None:
        argv += ["--config", str(config_file)]
    return argv


def child_env(
    settings: WorkerSettings,
    placement: Placement,
    overrides: Mapping[str, Any] | None = None,
    base_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The complete environment of one child: inherited, flags, then its pinning."""
    env = dict(os.environ if base_env is None else base_env)
    for name, value in flags_as_env(overrides or {}).items():
        _set(env, name, value)
    index = placement.index
    _set(env, f"{ENV_PREFIX}PROCESSES__DEVICES", "single")
    _set(env, f"{ENV_PREFIX}MODEL__DEVICE", placement.model_device)
    _set(env, "CUDA_VISIBLE_DEVICES", placement.cuda_visible_devices)
    base_port = settings.health.port
    port = base_port + index if base_port else 0
    if port > 65535:
        raise ConfigError(
            f"health.port {base_port} + {index} (process index) is above 65535; lower health.port"
        )
    _set(env, f"{ENV_PREFIX}HEALTH__PORT", str(port))
    base_id = settings.kafka.group_instance_id
    if base_id:
        instance_id = f"{base_id}-{index}"
        if len(instance_id) > 249:
            raise ConfigError(
                "kafka.group_instance_id is too long to add the process index; shorten it"
            )
        _set(env, f"{ENV_PREFIX}KAFKA__GROUP_INSTANCE_ID", instance_id)
    _set(env, PROCESS_INDEX_ENV, str(index))
    return env


def child_specs(
    settings: WorkerSettings,
    config_file: Path | None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    gpu_count: Callable[[], int] = count_gpus,
) -> list[ChildSpec]:
    """Every child to start for these settings."""
    environ = os.environ if environ is None else environ
    # The device of each child comes from processes.devices; a --device flag would beat
    # the child's environment, so it is not passed on.
    passed = {section: dict(values) for section, values in (overrides or {}).items()}
    passed.get("model", {}).pop("device", None)
    placements = resolve_devices(settings.processes.devices, environ, gpu_count)
    argv = child_argv(config_file)
    return [
        ChildSpec(placement, argv, child_env(settings, placement, passed, environ))
        for placement in placements
    ]
