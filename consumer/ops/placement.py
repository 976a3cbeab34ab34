"""Where each supervised worker process runs: `processes.devices` resolved to placements.

"cuda:<i>" means the i-th GPU the supervisor sees, as in torch, so a child is pinned
through CUDA_VISIBLE_DEVICES to the physical GPU (index or GPU-/MIG- UUID) behind it.
GPUs are counted without creating a CUDA context: the supervisor itself uses no GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from consumer.config import ConfigError


@dataclass(frozen=True)
class Placement:
    """Where child `index` runs: its configured device and what pins it there."""

    index: int
    device: str  # as configured: "cpu" or "cuda:<i>"
    model_device: Literal["cpu", "cuda"]
    cuda_visible_devices: str  # "" hides every GPU


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
