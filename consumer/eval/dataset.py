"""The labelled images of `emotion-worker eval`: the class folders, split files, sampling.

The folder has the Kaggle FER-2013 layout: one sub-folder per class, named after a label
of the model (or mapped to one with --class-map). A split file (JSON list, JSON object of
lists such as the trainer's split.json {"train": [...], "val": [...]}, or a text file with
one path per line) restricts the run to exactly those paths, relative to --data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consumer.config import FER_LABELS

# Where the training data comes from; the same text is in the Makefile (model, model-eval).
FER2013_SOURCE = (
    'for FER-2013 use the train folder of the Kaggle dataset "emotion-detection-fer" '
    "(FER-2013 of the ICML 2013 representation-learning challenge); for a smoke run the "
    "404 faces committed in data/faces are enough (--data data/faces)"
)


def missing_data_message(data: Path, labels: Sequence[str] = FER_LABELS) -> str:
    """The one line printed when --data is not a folder (train and eval, and the Makefile)."""
    folders = ", ".join(f"{label}/" for label in labels)
    return (
        f"--data {data} does not exist (or is not a folder): it must hold one folder of "
        f"images per class ({folders}); {FER2013_SOURCE}"
    )


class EvalError(Exception):
    """A mistake in the inputs (data folder, split file, labels); exit code 2."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One labelled image: its path, its path relative to --data, and its true label."""

    path: Path
    relative: str
    label: str


def parse_class_map(entries: Sequence[str]) -> dict[str, str]:
    """{folder: label} from "FOLDER=LABEL" entries (each may hold several, comma-separated)."""
    mapping: dict[str, str] = {}
    for entry in entries:
        for item in filter(None, (part.strip() for part in entry.split(","))):
            folder, sep, label = item.partition("=")
            if not sep or not folder.strip() or not label.strip():
                raise EvalError(f"--class-map entry {item!r} is not FOLDER=LABEL")
            mapping[folder.strip()] = label.strip()
    return mapping


def read_split(path: Path, split: str | None) -> list[str]:
    """The relative paths a split file lists, in order, without duplicates.

    JSON files hold a list of paths or an object of lists ({"train": [...], "val": [...]},
    what the trainer writes); `split` picks the list and defaults to "val". Any other file
    is text: one path per line, blank lines and lines starting with "#" ignored.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"split file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalError(f"split file {path} cannot be read: {exc}") from None
    entries: Any
    if path.suffix.lower() == ".json" or text.lstrip().startswith(("[", "{")):
        try:
            entries = json.loads(text)
        except ValueError as exc:
            raise EvalError(f"split file {path} is not valid JSON: {exc}") from None
        if isinstance(entries, dict):
            key = split or "val"
            if key not in entries:
                raise EvalError(
                    f"split file {path} has no list {key!r}; it has {sorted(entries)} "
                    "(choose one with --split)"
                )
            entries = entries[key]
        elif split is not None:
            raise EvalError(f"split file {path} is a plain list; --split {split} does not apply")
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise EvalError(f"split file {path}: the split must be a list of path strings")
    else:
        if split is not None:
            raise EvalError(f"split file {path} is a text file; --split {split} does not apply")
        entries = [line.strip() for line in text.splitlines()]
        entries = [line for line in entries if line and not line.startswith("#")]
    if not entries:
        raise EvalError(f"split file {path} lists no images")
    return list(dict.fromkeys(entries))


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _folder_images(data: Path) -> dict[str, list[Path]]:
    """{class folder name: its images, sorted}; hidden files and folders are ignored."""
    from consumer.event_source import IMAGE_SUFFIXES

    found: dict[str, list[Path]] = {}
    for entry in sorted(data.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found[entry.name] = sorted(
                p
                for p in entry.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES
                and p.is_file()
                and not _is_hidden(p.relative_to(data))
            )
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            raise EvalError(
                f"image {entry} lies directly in {data}, outside any class folder; the data "
                "folder must hold one folder per class (DATA/<class>/<image>)"
            )
    return found


def _label_of(folder: str, labels: Sequence[str], class_map: dict[str, str], data: Path) -> str:
    label = class_map.get(folder, folder)
    if label not in labels:
        via = f" (mapped to {label!r} by --class-map)" if folder in class_map else ""
        raise EvalError(
            f"class folder {folder!r} in {data}{via} is not one of the model's labels "
            f"{list(labels)}; rename the folder, map it with --class-map {folder}=LABEL, "
            "or give the model's labels with --labels"
        )
    return label


def collect_samples(
    data: Path,
    labels: Sequence[str],
    *,
    class_map: dict[str, str] | None = None,
    split_paths: Sequence[str] | None = None,
    per_class: int | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Sample]:
    """The labelled images to evaluate, sorted by relative path.

    --per-class and --limit take seeded random samples (the same seed picks the same faces
    on every machine), not the first files: FER's files are numbered in collection order,
    and the first N of a folder are not a fair sample of it.
    """
    class_map = class_map or {}
    if not data.is_dir():
        raise EvalError(missing_data_message(data, labels))
    by_label: dict[str, list[Sample]] = {}
    if split_paths is None:
        folders = _folder_images(data)
        for folder, paths in folders.items():
            label = _label_of(folder, labels, class_map, data)
            by_label.setdefault(label, []).extend(
                Sample(p, p.relative_to(data).as_posix(), label) for p in paths
            )
    else:
        missing: list[str] = []
        for entry in split_paths:
            path = Path(entry) if Path(entry).is_absolute() else data / entry
            try:
                relative = path.relative_to(data)
            except ValueError:
                raise EvalError(
                    f"split path {entry!r} is not inside the data folder {data}"
                ) from None
            if len(relative.parts) < 2:
                raise EvalError(
                    f"split path {entry!r} is not inside a class folder (expected <class>/<image>)"
                )
            if not path.is_file():
                missing.append(entry)
                continue
            label = _label_of(relative.parts[0], labels, class_map, data)
            by_label.setdefault(label, []).append(Sample(path, relative.as_posix(), label))
        if missing:
            raise EvalError(
                f"{len(missing)} of {len(split_paths)} paths of the split file do not exist under "
                f"{data}, e.g. {missing[:3]}; is --data the folder the split was made from?"
            )
    rng = random.Random(seed)
    picked: list[Sample] = []
    for label in sorted(by_label):
        samples = sorted(by_label[label], key=lambda s: s.relative)
        if per_class is not None and len(samples) > per_class:
            samples = rng.sample(samples, per_class)
        picked.extend(samples)
    if limit is not None and len(picked) > limit:
        picked = rng.sample(picked, limit)
    if not picked:
        raise EvalError(
            f"no images found in {data}"
            + (" for the split" if split_paths is not None else "")
            + "; expected one folder per class holding images (DATA/<class>/*.png)"
        )
    return sorted(picked, key=lambda s: s.relative)
