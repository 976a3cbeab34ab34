"""Image preprocessing on the model's device, reproducing the checkpoint's image processor.

The Hugging Face CLIP image processor resizes, crops and normalises one PIL image at a time
on the CPU. Here the decoded faces travel as small uint8 tensors and the same steps run in
batch on the device: resize (shortest edge, bicubic with PIL's antialiasing kernel), round
to uint8 like PIL does, center crop (padding first if an image is smaller than the crop),
rescale and normalise. tests/unit/test_preprocess.py states how close this stays to the
processor's own pixel values on real FER faces.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (torch's convention)
from PIL import Image

from consumer.engine.loader import ModelLoadError

# PIL resample codes -> torch interpolate modes (antialias=True matches PIL's filters).
_MODES = {3: "bicubic", 2: "bilinear", 0: "nearest"}


@dataclass(frozen=True)
class ProcessorSpec:
    """The steps and constants of a CLIP-style image processor config."""

    resize_shortest: int | None  # resize so the shorter side has this length
    resize_to: tuple[int, int] | None  # or to exactly (height, width)
    mode: str
    crop: tuple[int, int] | None  # center crop (height, width)
    scale: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    @classmethod
    def from_image_processor(cls, processor: Any) -> ProcessorSpec:
        """Read the settings of a loaded (CLIP-style) image processor."""
        size = _as_dict(getattr(processor, "size", None))
        crop = _as_dict(getattr(processor, "crop_size", None))
        resample = int(getattr(processor, "resample", 3) or 3)
        if resample not in _MODES:
            raise ModelLoadError(
                f"image processor resample={resample} has no device equivalent; "
                'set model.preprocess = "processor"'
            )
        if getattr(processor, "do_pad", False):
            raise ModelLoadError(
                'image processor pads to square (do_pad); set model.preprocess = "processor"'
            )
        do_resize = bool(getattr(processor, "do_resize", True))
        shortest = size.get("shortest_edge") if do_resize else None
        exact = (size["height"], size["width"]) if do_resize and "height" in size else None
        do_norm = bool(getattr(processor, "do_normalize", True))
        return cls(
            resize_shortest=int(shortest) if shortest else None,
            resize_to=(int(exact[0]), int(exact[1])) if exact else None,
            mode=_MODES[resample],
            crop=(int(crop["height"]), int(crop["width"]))
            if getattr(processor, "do_center_crop", False) and crop
            else None,
            scale=float(processor.rescale_factor)
            if getattr(processor, "do_rescale", True)
            else None,
            mean=tuple(processor.image_mean) if do_norm else None,
            std=tuple(processor.image_std) if do_norm else None,
        )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Size after resize, as the Hugging Face processor computes it."""
        if self.resize_to is not None:
            return self.resize_to
        if self.resize_shortest is None:
            return height, width
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = self.resize_shortest, int(self.resize_shortest * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)


def _as_dict(value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    return {
        k: getattr(value, k)
        for k in ("height", "width", "shortest_edge")
        if getattr(value, k, None) is not None
    }


class DevicePreprocessor:
    """PIL faces -> normalised pixel values (N, 3, H, W) on `device`, in batch."""

    def __init__(self, spec: ProcessorSpec, device: torch.device, dtype: torch.dtype) -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(spec.mean, device=device).view(shape) if spec.mean else None
        self._std = torch.tensor(spec.std, device=device).view(shape) if spec.std else None

    def __call__(self, faces: Sequence[Image.Image]) -> torch.Tensor:
        # Faces of one size are resized together; a frame's crops differ, FER faces do not.
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, face in enumerate(faces):
            if not isinstance(face, Image.Image):
                raise TypeError(f"classify() takes PIL images, got {type(face).__name__}")
            groups[(face.height, face.width)].append(index)
        out: torch.Tensor | None = None
        for (height, width), indices in groups.items():
            arrays = np.stack([np.asarray(as_rgb(faces[i]), dtype=np.uint8) for i in indices])
            batch = torch.from_numpy(arrays).to(self.device, non_blocking=True)
            pixels = self._process(batch.permute(0, 3, 1, 2).float(), height, width)
            if out is None:
                out = torch.empty(
                    (len(faces), *pixels.shape[1:]), device=self.device, dtype=self.dtype
                )
            out[torch.tensor(indices, device=self.device)] = pixels.to(self.dtype)
        if out is None:
            raise ValueError("no faces to preprocess")
        return out

    def _process(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        spec = self.spec
        target = spec.output_size(height, width)
        if target != (height, width):
            # PIL resizes in two passes, horizontal then vertical, rounding to uint8 after
            # each; doing the same keeps the pixels within a level or so of the processor's.
            x = _resize_pass(x, (height, target[1]), spec.mode)
            x = _resize_pass(x, target, spec.mode)
        if spec.crop is not None:
            x = _center_crop(x, spec.crop)
        if spec.scale is not None:
            x = x * spec.scale
        if self._mean is not None and self._std is not None:
            x = (x - self._mean) / self._std
        return x


def _resize_pass(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    resized = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    return resized.round().clamp(0, 255)


def _center_crop(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    crop_h, crop_w = crop
    height, width = x.shape[-2:]
    if height < crop_h or width < crop_w:  # the processor pads with zeros first
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        height, width = x.shape[-2:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return x[..., top : top + crop_h, left : left + crop_w]


def as_rgb(face: Image.Image) -> Image.Image:
    """The face as an RGB image (the engine's one conversion); refuses non-images."""
    if not isinstance(face, Image.Image):
        raise TypeError(f"classify() takes PIL images, got {type(face).__name__}")
    return face if face.mode == "RGB" else face.convert("RGB")
