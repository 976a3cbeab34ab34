"""Resuming a run: its state after every epoch, in the output folder, without pickles.

Training the shipped model on a CPU takes hours, longer than one sitting. After each epoch
the run writes `<out>/.resume/state.safetensors` (the current weights, the training probe's,
AdamW's moments, the random generators' states) and `state.json` (the epoch, the log so far,
the settings it was started with). A rerun of the same command with the same settings
continues after the last finished epoch; other settings start afresh (and say so). Plain
safetensors + JSON rather than torch.save: loading a pickle runs code, which this project
never does with files from disk.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESUME_DIR = ".resume"
_TENSORS = "state.safetensors"
_META = "state.json"


@dataclass
class Progress:
    """What the loop needs to go on after `epoch`."""

    epoch: int
    global_step: int
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    train_seconds: float
    seen: int


def _settings_key(settings: dict[str, Any]) -> str:
    # The command line and the output folder may differ between sittings; the rest may not.
    kept = {k: v for k, v in settings.items() if k not in ("command", "out", "threads")}
    return json.dumps(kept, sort_keys=True, default=str)


def save_state(
    out: Path,
    settings: dict[str, Any],
    progress: Progress,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
) -> None:
    """Write the state after an epoch; the previous one is replaced only once it is whole."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for name, value in module.state_dict().items():
            tensors[f"{prefix}.{name}"] = value.detach().cpu().contiguous()
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().cpu()
    for name, generator in generators.items():
        tensors[f"rng.{name}"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    folder = out / RESUME_DIR
    staging = out / f"{RESUME_DIR}.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(tensors, str(staging / _TENSORS))
    meta = {"settings": _settings_key(settings), **progress.__dict__}
    (staging / _META).write_text(json.dumps(meta) + "\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def load_state(
    out: Path,
    settings: dict[str, Any],
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
) -> tuple[Progress | None, str]:
    """Restore a saved state of a run with the same settings: (progress, what happened);
    the message is empty when there was no state to use."""
    folder = out / RESUME_DIR
    if not (folder / _META).is_file() or not (folder / _TENSORS).is_file():
        return None, ""
    meta = json.loads((folder / _META).read_text(encoding="utf-8"))
    if meta.pop("settings") != _settings_key(settings):
        return None, f"{folder} was saved by a run with other settings; starting afresh"
    from safetensors.torch import load_file

    tensors = load_file(str(folder / _TENSORS))
    for prefix, module in modules.items():
        start = f"{prefix}."
        module.load_state_dict(
            {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}
        )
    optimizer_state = optimizer.state_dict()
    restored: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            restored.setdefault(int(index), {})[name] = value
    optimizer_state["state"] = restored
    optimizer.load_state_dict(optimizer_state)
    for name, generator in generators.items():
        generator.set_state(tensors[f"rng.{name}"])
    torch.set_rng_state(tensors["rng.torch"])
    progress = Progress(**meta)
    return progress, f"resuming after epoch {progress.epoch} from {folder}"


def clear_state(out: Path) -> None:
    """Remove the saved state once the run has finished."""
    shutil.rmtree(out / RESUME_DIR, ignore_errors=True)
