"""A labelled face folder in memory: listing, stratified split, pixels, augmentation.

The whole training set is decoded once into one uint8 tensor (FER-2013's 28,709 48x48 gray
faces are 66 MB), so an epoch costs no file I/O and no decoding. Augmentation then runs on
whole batches with torch ops (one affine warp per face plus photometric jitter), which on
two CPU cores is far cheaper than per-image PIL transforms and draws every random number
from one seeded generator, so a run is repeatable.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (torch's convention)
from PIL import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


class DatasetError(ValueError):
    """The data folder cannot be used for training; the message says why and what to fix."""


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled image: its path relative to the data folder (POSIX) and label index."""

    path: str
    label: int


@dataclass(frozen=True, slots=True)
class Split:
    """The stratified train/validation partition of a folder's examples."""

    train: list[Example]
    val: list[Example]

    def to_json(self) -> dict[str, list[str]]:
        """split.json's content: relative paths, so the split is checked into the model card."""
        return {"train": [e.path for e in self.train], "val": [e.path for e in self.val]}


def scan_folder(root: Path, labels: Sequence[str]) -> list[Example]:
    """Every image under root/<label>/, sorted by path; refuses folders that are not labels.

    An unknown class folder is an error rather than being skipped: silently training on a
    subset of the classes a folder holds is the kind of mistake nobody notices.
    """
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist")
    index = {label: i for i, label in enumerate(labels)}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        raise DatasetError(
            f"data folder {root} has class folders {unknown} that are not labels "
            f"{list(labels)}; pass --labels or remove them"
        )
    examples = [
        Example(path.relative_to(root).as_posix(), index[folder.name])
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    ]
    if not examples:
        raise DatasetError(f"data folder {root} has no images in label folders {list(labels)}")
    return examples


def _by_class(examples: Sequence[Example]) -> dict[int, list[Example]]:
    groups: dict[int, list[Example]] = {}
    for example in sorted(examples, key=lambda e: (e.label, e.path)):
        groups.setdefault(example.label, []).append(example)
    return groups


def stratified_split(examples: Sequence[Example], val_fraction: float, seed: int) -> Split:
    """Per class, a seeded shuffle of the sorted paths; the first round(n * fraction) are val.

    Every class with at least two images gets at least one validation and one training
    image, so a rare class (FER's "disgusted", 1.5%) is always measured. The result depends
    only on the set of paths, the fraction and the seed, not on listing order.
    """
    if not 0 <= val_fraction < 1:
        raise DatasetError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    rng = random.Random(seed)
    train: list[Example] = []
    val: list[Example] = []
    for _, members in sorted(_by_class(examples).items()):
        shuffled = list(members)
        rng.shuffle(shuffled)
        count = round(len(shuffled) * val_fraction)
        if val_fraction > 0 and len(shuffled) >= 2:
            count = min(max(count, 1), len(shuffled) - 1)
        val.extend(shuffled[:count])
        train.extend(shuffled[count:])
    return Split(train=sorted(train, key=_key), val=sorted(val, key=_key))


def subsample(examples: Sequence[Example], limit: int, seed: int) -> list[Example]:
    """At most `limit` examples keeping the class proportions (--limit, for quick runs)."""
    if limit >= len(examples):
        return list(examples)
    rng = random.Random(seed)
    groups = _by_class(examples)
    total = len(examples)
    picked: list[Example] = []
    for _, members in sorted(groups.items()):
        shuffled = list(members)
        rng.shuffle(shuffled)
        picked.extend(shuffled[: max(1, round(limit * len(members) / total))])
    return sorted(picked, key=_key)


def _key(example: Example) -> tuple[int, str]:
    return example.label, example.path


def class_counts(examples: Sequence[Example], num_labels: int) -> list[int]:
    """Images per label index (zeros for absent labels)."""
    counts = Counter(e.label for e in examples)
    return [counts.get(i, 0) for i in range(num_labels)]


def load_pixels(root: Path, examples: Sequence[Example], image_size: int) -> torch.Tensor:
    """Decode every image to uint8 (N, C, S, S): C is 1 if all are grayscale, else 3.

    Larger or non-square images are resized (shortest edge to S, bicubic) and center
    cropped, as the CLIP image processor does; FER's 48x48 faces pass through untouched.
    """
    decoded: list[np.ndarray] = []
    gray = True
    for example in examples:
        with Image.open(root / example.path) as image:
            picture = _fit(image if image.mode == "L" else image.convert("RGB"), image_size)
            gray = gray and picture.mode == "L"
            decoded.append(np.array(picture))
    if gray:
        return torch.from_numpy(np.stack(decoded)[:, None])
    rgb = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in decoded]
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).contiguous()


def _fit(image: Image.Image, size: int) -> Image.Image:
    if image.size == (size, size):
        return image
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))),
        Image.Resampling.BICUBIC,
    )
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


@dataclass(frozen=True, slots=True)
class Augment:
    """Random transforms for small aligned grayscale faces (FER-2013 style).

    - random resized crop, area `scale` and aspect `ratio` (faces are already centred and
      aligned, so crops stay large: they add shift and zoom, not new framing);
    - horizontal flip (expressions are mirror-symmetric; vertical flips are not realistic);
    - rotation within +-`degrees` (head tilt);
    - brightness and contrast jitter (FER mixes lighting and camera gain);
    - optional random erasing of one rectangle (occlusion by hands, glasses).
    No hue/saturation jitter: the faces are gray.
    """

    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (0.9, 1.1)
    degrees: float = 10.0
    flip: float = 0.5
    brightness: float = 0.25
    contrast: float = 0.25
    erase: float = 0.0
    erase_area: tuple[float, float] = (0.02, 0.12)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 (B, C, H, W) -> uint8 of the same shape; random draws only from `generator`.

        The result is rounded back to uint8 so training sees the same quantised pixels the
        worker sees from a decoded image.
        """
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(
                f"expected uint8 (B, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        batch = images.shape[0]
        x = images.float()
        # The draws come from the CPU generator (so a run repeats on any device); the pixel
        # work runs where the images are (the GPU when training on one).

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(batch, generator=generator)

        area = uniform(*self.scale)
        aspect = torch.exp(uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        width = torch.sqrt(area * aspect).clamp(max=1.0)
        height = torch.sqrt(area / aspect).clamp(max=1.0)
        # Crop centre in normalised coordinates, anywhere the crop fits inside the image.
        cx = (1 - width) * uniform(-1.0, 1.0)
        cy = (1 - height) * uniform(-1.0, 1.0)
        angle = torch.deg2rad(uniform(-self.degrees, self.degrees))
        mirror = torch.where(torch.rand(batch, generator=generator) < self.flip, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [
                torch.stack([width * cos * mirror, -width * sin, cx], dim=1),
                torch.stack([height * sin * mirror, height * cos, cy], dim=1),
            ],
            dim=1,
        ).to(x.device)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        gain = uniform(1 - self.brightness, 1 + self.brightness).view(-1, 1, 1, 1).to(x.device)
        spread = uniform(1 - self.contrast, 1 + self.contrast).view(-1, 1, 1, 1).to(x.device)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * spread + mean) * gain
        if self.erase > 0:
            x = self._erase(x, generator)
        return x.round_().clamp_(0, 255).to(torch.uint8)

    def describe(self) -> str:
        """The augmentation in words, for the model card."""
        if self == NO_AUGMENT:
            return "none"
        parts = [
            f"random resized crop (area {self.scale[0]:g}-{self.scale[1]:g})",
            f"flip p={self.flip:g}",
            f"rotation +-{self.degrees:g} deg",
            f"brightness/contrast +-{self.brightness:g}/{self.contrast:g}",
        ]
        if self.erase:
            parts.append(f"random erasing p={self.erase:g}")
        return ", ".join(parts)

    def _erase(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, _, height, width = x.shape
        draws = torch.rand(batch, 5, generator=generator).to(x.device)
        ys = torch.arange(height, device=x.device).view(1, height, 1)
        xs = torch.arange(width, device=x.device).view(1, 1, width)
        area = self.erase_area[0] + (self.erase_area[1] - self.erase_area[0]) * draws[:, 0]
        side_h = (area.sqrt() * height).clamp(min=1).view(-1, 1, 1)
        side_w = (area.sqrt() * width).clamp(min=1).view(-1, 1, 1)
        top = (draws[:, 1].view(-1, 1, 1) * (height - side_h)).floor()
        left = (draws[:, 2].view(-1, 1, 1) * (width - side_w)).floor()
        inside = (ys >= top) & (ys < top + side_h) & (xs >= left) & (xs < left + side_w)
        chosen = (draws[:, 3] < self.erase).view(-1, 1, 1)
        fill = (draws[:, 4] * 255).view(-1, 1, 1, 1)
        mask = (inside & chosen).unsqueeze(1)
        return torch.where(mask, fill.expand_as(x), x)


NO_AUGMENT = Augment(
    scale=(1.0, 1.0), ratio=(1.0, 1.0), degrees=0.0, flip=0.0, brightness=0.0, contrast=0.0
)


@dataclass(frozen=True, slots=True)
class Normalizer:
    """uint8 faces -> the model's pixel_values, as the checkpoint's CLIP image processor does.

    Rescale by 1/255 and normalise with the processor's mean and std; gray faces get their
    one channel replicated (the worker converts them to RGB, which does the same); a stored
    size that differs from the model's input is resized with antialiased bicubic, as the
    engine's device preprocessing does.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1 / 255

    @classmethod
    def for_processor(cls, image_processor: Any) -> Normalizer:
        """The normaliser of a loaded CLIP image processor (its crop size, mean and std)."""
        crop = image_processor.crop_size  # a dict or SizeDict with height and width
        return cls(
            size=int(crop["height"]),
            mean=tuple(image_processor.image_mean),
            std=tuple(image_processor.image_std),
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 1|3, H, W) -> float32 (B, 3, size, size)."""
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False
            ).clamp(0, 255)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x * self.rescale - mean) / std
