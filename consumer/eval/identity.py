"""What exactly an evaluation scored: the sha256 identity of a checkpoint's model files.

A report names the identity of the weights it evaluated, so a retrained model (or any
change to a file the model computes with) is seen to need a new report.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

# Files of a checkpoint folder that describe a model rather than make it: the model card(s)
# and the records `emotion-worker train` writes beside the weights. They are left out of the
# identity (see checkpoint_identity).
NOT_MODEL_FILES = frozenset(
    {"training_args.json", "train_log.jsonl", "split.json", "eval_report.json"}
)
IDENTITY_EXCLUDES = "dot-files, *.md, " + ", ".join(sorted(NOT_MODEL_FILES)) + " excluded"


def is_model_file(relative: Path) -> bool:
    """Whether a file (path relative to the checkpoint folder) counts in the identity."""
    if any(part.startswith(".") for part in relative.parts):
        return False
    return relative.suffix.lower() != ".md" and relative.name not in NOT_MODEL_FILES


def checkpoint_identity(folder: Path) -> dict[str, Any]:
    """What exactly was evaluated: a sha256 over the files the model computes with.

    Files are hashed one by one (sha256 of the contents); the identity is the sha256 of the
    lines "<relative posix path>\\t<file sha256>\\n" sorted by path. Only what determines
    the model's outputs counts: weights, configs, tokenizer and processor files. Left out:

    * hidden files and hidden folders (any path part starting with "."): bookkeeping (the
      tiny checkpoint's completion marker, a .cache/ or .git/ beside the weights);
    * documentation and training records: *.md model cards, training_args.json,
      train_log.jsonl, split.json and eval_report.json. They describe how the weights were
      made and how they scored; editing the card (or re-recording the training run) does
      not change a single prediction, so it must not orphan an evaluation report of the
      same weights. Conversely, any change to a file that is hashed (config.json, the
      weights, the tokenizer) gives a new identity and needs a new report.

    A copy of the same model files gets the same identity. Symlinked files are hashed by
    their target's contents, so a Hugging Face cache snapshot (all symlinks into blobs/)
    and a plain copy agree; symlinked folders are not followed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    files: list[dict[str, Any]] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = Path(root) / name
            relative = path.relative_to(folder)
            if not is_model_file(relative):
                continue
            with path.open("rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            files.append(
                {
                    "path": relative.as_posix(),
                    "bytes": path.stat().st_size,
                    "sha256": digest,
                }
            )
    files.sort(key=lambda item: str(item["path"]))
    manifest = "".join(f"{item['path']}\t{item['sha256']}\n" for item in files)
    return {
        "sha256": hashlib.sha256(manifest.encode("utf-8")).hexdigest(),
        "files": files,
        "bytes": sum(int(item["bytes"]) for item in files),
        "method": f"sha256 of sorted '<path>\\t<sha256>\\n' lines; {IDENTITY_EXCLUDES}",
    }
