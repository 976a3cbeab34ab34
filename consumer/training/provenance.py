"""Where a run's code came from: the repository, its commit, the library versions."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

# The checkout this package runs from (consumer/training/ is two levels below it).
REPO = Path(__file__).resolve().parents[2]


def git_commit() -> dict[str, Any]:
    """The checkout's HEAD and whether consumer/ has uncommitted changes; None outside git."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "consumer"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def library_versions(lora: bool) -> dict[str, str]:
    """Python and the libraries that decide a run's numbers (peft only for LoRA runs)."""
    import numpy
    import tokenizers
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": numpy.__version__,
    }
    if lora:
        import peft

        versions["peft"] = peft.__version__
    return versions
