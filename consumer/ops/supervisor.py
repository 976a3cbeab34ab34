"""One worker process per device under one supervisor (`processes.devices` other than "single").

Why processes and not threads: each worker owns one GPU, one Kafka consumer and its own
Python interpreter (GIL, CUDA context, torch.compile caches), and a crash of one must not
corrupt the others' state. All children join the same consumer group, so Kafka spreads
the input partitions over them exactly as it would over separate pods.

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

Signals: the first SIGTERM/SIGINT is forwarded to every child (they drain and commit),
a second one again (they exit at once). A child that exits while no stop was asked for
stops the others and makes the supervisor exit 1, so the pod is restarted as a whole
rather than running on fewer GPUs than it holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from consumer.config import ENV_PREFIX, ConfigError, WorkerSettings
from consumer.ops.logs import PROCESS_INDEX_ENV

# How long the supervisor waits for children after asking them to stop, on top of their
# own drain timeout (closing the clients, the final commit), before it kills them.
STOP_MARGIN_S = 30.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Placement:
    """Where child `index` runs: its configured device and what pins it there."""

    index: int
    device: str  # as configured: "cpu" or "cuda:<i>"
    model_device: Literal["cpu", "cuda"]
    cuda_visible_devices: str  # "" hides every GPU


@dataclass(frozen=True)
class ChildSpec:
    """A child process to start: its placement, command line and complete environment."""

    placement: Placement
    argv: list[str]
    env: dict[str, str]


# ---- devices ----------------------------------------------------------------------------


def parse_cuda_visible_devices(value: str) -> list[str]:
    """The entries of CUDA_VISIBLE_DEVICES that CUDA would use, in its order.

    CUDA stops at the first empty or invalid entry ("-1" is the usual way to hide all);
    entries may be indices or GPU-/MIG- UUIDs, which are passed on to children unchanged.
    """
    entries: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if not entry or (entry.lstrip("-").isdigit() and int(entry) < 0):
            break
        entries.append(entry)
    return entries


def count_gpus() -> int:
    """GPUs this machine shows, without creating a CUDA context in the supervisor.

    nvidia-smi asks the driver only; torch is the fallback (slow to import, and
    device_count() does not create a context either).
    """
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            listing = subprocess.run(
                [smi, "-L"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return 0
        if listing.returncode != 0:
            return 0  # a driver that does not answer has no usable GPU
        return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))
    import torch

    return int(torch.cuda.device_count())


def visible_gpus(
    environ: Mapping[str, str], gpu_count: Callable[[], int] = count_gpus
) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each GPU a child may be pinned to."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return parse_cuda_visible_devices(environ["CUDA_VISIBLE_DEVICES"])
    return [str(i) for i in range(gpu_count())]


def resolve_devices(
    devices: str | Sequence[str],
    environ: Mapping[str, str] | None = None,
    gpu_count: Callable[[], int] = count_gpus,
) -> list[Placement]:
    """One placement per worker process for `processes.devices` ("auto" or a list).

    "cuda:<i>" means the i-th GPU this process sees, as in torch: under
    CUDA_VISIBLE_DEVICES="2,3", "cuda:1" pins the child to physical GPU 3.
    """
    environ = os.environ if environ is None else environ
    if devices == "single":
        raise ValueError("processes.devices='single' needs no supervisor")
    if isinstance(devices, str):
        if devices != "auto":
            raise ConfigError(f"processes.devices={devices!r}: use 'single', 'auto' or a list")
        gpus = visible_gpus(environ, gpu_count)
        if not gpus:
            shown = environ.get("CUDA_VISIBLE_DEVICES")
            hint = f" (CUDA_VISIBLE_DEVICES={shown!r})" if shown is not None else ""
            raise ConfigError(
                f"processes.devices=auto found no CUDA GPU{hint}; use 'single' or list "
                'devices, e.g. processes.devices=["cpu", "cpu"]'
            )
        return [Placement(i, f"cuda:{i}", "cuda", gpu) for i, gpu in enumerate(gpus)]
    placements = []
    gpus_seen: list[str] | None = None
    for index, device in enumerate(devices):
        if device == "cpu":
            placements.append(Placement(index, "cpu", "cpu", ""))
            continue
        ordinal = int(device.removeprefix("cuda:"))
        if "CUDA_VISIBLE_DEVICES" in environ:
            gpus_seen = gpus_seen or parse_cuda_visible_devices(environ["CUDA_VISIBLE_DEVICES"])
            if ordinal >= len(gpus_seen):
                raise ConfigError(
                    f"processes.devices entry {device!r}: only {len(gpus_seen)} GPU(s) are "
                    f"visible (CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']!r})"
                )
            placements.append(Placement(index, device, "cuda", gpus_seen[ordinal]))
        else:
            placements.append(Placement(index, device, "cuda", str(ordinal)))
    return placements


# ---- child command line and environment -------------------------------------------------


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


# ---- the supervisor ---------------------------------------------------------------------


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the supervisor dies.

    Children have their own process group (so a terminal's Ctrl-C reaches them once, via
    the supervisor); without this, a supervisor killed by SIGKILL would leave them running.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork, not after
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes]
    signals_sent: int = 0
    code: int | None = None  # set once reaped
    clean: bool = False


@dataclass
class Supervisor:
    """Starts the children, forwards stop signals, and turns their exits into one code."""

    specs: Sequence[ChildSpec]
    stop_timeout_s: float
    log: Any
    poll_s: float = 0.05
    # Signals every child is to receive, in order: the caught ones, and a SIGTERM of our
    # own when a child died. The main loop delivers them (the handler only records them).
    _requests: list[int] = field(default_factory=list)
    _children: list[_Child] = field(default_factory=list)
    _failed: bool = False
    _logged_requests: int = 0

    def run(self) -> int:
        previous = {signum: signal.signal(signum, self._on_signal) for signum in _STOP_SIGNALS}
        try:
            if not self._start_all():
                self._failed = True
            deadline: float | None = None
            killed = False
            while True:
                self._deliver()
                self._reap()
                if all(child.code is not None for child in self._children):
                    break
                if self._requests and deadline is None:
                    deadline = time.monotonic() + self.stop_timeout_s
                if deadline is not None and not killed and time.monotonic() > deadline:
                    killed = True
                    self._failed = True
                    self._kill_remaining("worker process did not stop in time; killing it")
                time.sleep(self.poll_s)
        except BaseException:
            self._kill_remaining("supervisor failing; killing worker process")
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        code = 1 if self._failed or not all(c.clean for c in self._children) else 0
        self.log.info("supervisor exiting", code=code)
        return code

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._requests.append(signum)

    def _start_all(self) -> bool:
        for spec in self.specs:
            if self._requests:
                return True  # asked to stop while starting: start no more
            try:
                proc = subprocess.Popen(
                    spec.argv,
                    env=spec.env,
                    # Own process group: a terminal's Ctrl-C must not reach a child twice
                    # (directly and forwarded), which would skip its drain.
                    process_group=0,
                    preexec_fn=_die_with_parent(os.getpid()),
                )
            except OSError as exc:
                self.log.error(
                    "worker process failed to start", index=spec.placement.index, error=str(exc)
                )
                self._stop_all()
                return False
            self._children.append(_Child(spec, proc))
            self.log.info(
                "worker process started",
                index=spec.placement.index,
                device=spec.placement.device,
                pid=proc.pid,
            )
        return True

    def _deliver(self) -> None:
        if self._children and len(self._requests) > self._logged_requests:
            for signum in self._requests[self._logged_requests :]:
                self.log.info("forwarding signal to worker processes", signal=_signal_name(signum))
            self._logged_requests = len(self._requests)
        for child in self._children:
            while child.code is None and child.signals_sent < len(self._requests):
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(self._requests[child.signals_sent])
                child.signals_sent += 1

    def _reap(self) -> None:
        for child in self._children:
            if child.code is not None:
                continue
            code = child.proc.poll()
            if code is None:
                continue
            child.code = code
            asked = child.signals_sent > 0
            # A child signalled before it installed its handlers dies of that signal; it
            # had consumed nothing, so that is a clean stop too.
            child.clean = asked and (code == 0 or code == -self._requests[0])
            fields: dict[str, Any] = {
                "index": child.spec.placement.index,
                "device": child.spec.placement.device,
                "pid": child.proc.pid,
                "code": code,
            }
            if code < 0:
                fields["signal"] = _signal_name(-code)
            if asked:
                self.log.info("worker process exited", **fields)
            else:
                self.log.error("worker process exited", unexpected=True, **fields)
                self._failed = True
                self._stop_all()

    def _stop_all(self) -> None:
        """Ask every child to drain, unless a stop was asked for already.

        Once only: children take a second signal as "exit at once", and two children
        dying in the same turn must not cut the survivors' drain short.
        """
        if not self._requests:
            self.log.error("stopping the other worker processes")
            self._requests.append(signal.SIGTERM)

    def _kill_remaining(self, message: str) -> None:
        for child in self._children:
            if child.code is None and child.proc.poll() is None:
                self.log.error(
                    message,
                    index=child.spec.placement.index,
                    pid=child.proc.pid,
                )
                child.proc.kill()


def run_supervisor(
    settings: WorkerSettings,
    config_file: Path | None,
    overrides: Mapping[str, Any] | None = None,
) -> int:
    """`emotion-worker run` with processes.devices other than "single": 0 if all stopped cleanly."""
    from consumer.ops.logs import configure_logging, get_logger

    configure_logging(settings.log)
    log = get_logger("consumer.ops.supervisor")
    specs = child_specs(settings, config_file, overrides)
    log.info(
        "supervisor starting",
        devices=[spec.placement.device for spec in specs],
        cuda_visible_devices=[spec.placement.cuda_visible_devices for spec in specs],
        health_ports=[int(spec.env[f"{ENV_PREFIX}HEALTH__PORT"]) for spec in specs],
    )
    if settings.model.device != "auto":
        log.info(
            "model.device is chosen per process by processes.devices",
            ignored=settings.model.device,
        )
    stop_timeout = settings.flow.drain_timeout_s + STOP_MARGIN_S
    return Supervisor(specs, stop_timeout_s=stop_timeout, log=log).run()
