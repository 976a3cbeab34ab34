"""INT8 W8A8 inference for the language model's linear layers of a LLaVA (A100-class GPUs).

What is quantized
    The same layers as FP8 (consumer.engine.linears: the language model's ``nn.Linear``
    layers; not the lm_head, vision tower, projector, embeddings or norms). Both operands
    become int8, symmetric (zero point 0), with one float32 scale per row:

    * weight: one scale per output feature (``absmax(row) / 127``), quantized once by
      ``Int8Linear.from_linear`` when the model is loaded;
    * activation: one scale per token (``absmax(token) / 127``), computed on every call with
      vectorised tensor ops, so a token with a large magnitude gets its own scale instead of
      flattening every other token's values to zero.

    The product is exact: int8 x int8 summed in int32 (``torch._int_mm``: cuBLAS int8 tensor
    cores on CUDA, a oneDNN/VNNI kernel on the CPU). The output is then
    ``acc * scale_x[i] * scale_w[j] (+ bias)`` in float32, cast to the activation's dtype.
    Where the kernel cannot take the shape (CUDA needs in/out features that are multiples of
    8) or torch has no ``_int_mm``, an emulation forms the same int32 sums with a float64
    matmul, so both paths give the same bits (tests/unit/test_int8.py checks it).

SmoothQuant (optional)
    int8 keeps 127 levels per row, so a token whose few "outlier" channels are 50-100x the
    others (common in trained LLMs) leaves the ordinary channels only a handful of levels.
    SmoothQuant migrates that range into the weight: per input channel j,
    ``s_j = max|X_j| ** alpha / max|W[:, j]| ** (1 - alpha)``; the layer divides its input
    by ``s`` and the weight is quantized as ``W * s`` (the product is unchanged in exact
    arithmetic). It needs activation statistics (``max|X_j|``), which come from a
    calibration pass (``linears.record_inputs``) and are passed to ``from_linear``. Here the
    division happens inside the layer (one more element-wise op, fused by torch.compile)
    rather than being folded into the preceding norm as the paper does: simpler, and it
    works for o_proj and down_proj too, which have no norm in front of them.

Expected accuracy cost
    Round-to-nearest with step ``absmax / 127`` gives an RMS error of ``step / sqrt(12)``;
    for Gaussian rows (absmax ~ 3-4 sigma) that is ~0.8% of the RMS per operand, ~1.1% on
    the output: about a third of FP8's 3.7%, measured in the unit tests. Outlier channels
    raise it (without SmoothQuant), which is what the start-up fidelity check guards.

This path is for inference only: ``Int8Linear`` has no trainable weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Self

import torch
from torch import nn

from consumer.engine.linears import DEFAULT_MIN_FEATURES, apply_moving_only, replace_linears

__all__ = ["Int8Linear", "int_mm_available", "quantize_language_model_int8", "smoothing_factors"]

INT8_MAX = 127  # symmetric: -128 is never used, so negation cannot overflow
# Floor for a row's absmax before it becomes a scale: an all-zero row would otherwise give
# scale 0 and 0/0 = NaN; rows below it quantize to 0, harmless at that size.
_MIN_ABSMAX = 1e-12
# CUDA's torch._int_mm (cuBLAS) wants K and N multiples of 8 and more than 16 rows
# ("self.size(0) needs to be greater than 16"); fewer rows are padded with zeros up to 32.
_INT_MM_MULTIPLE = 8
_INT_MM_MIN_ROWS = 17
_INT_MM_PADDED_ROWS = 32
# SmoothQuant factors are kept in this range: a dead channel (max 0 on either side) or a
# calibration quirk must not make the weight or the activation overflow.
_SMOOTH_RANGE = (1e-5, 1e5)


def int_mm_available(device: torch.device) -> bool:
    """Whether torch._int_mm exists and runs on this device type (CPU or CUDA)."""
    return hasattr(torch, "_int_mm") and device.type in ("cpu", "cuda")


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric absmax quantization of a 2D tensor: (int8 values, (rows, 1) float32
    scales), values ~= q.float() * scale. Vectorised: a reduction and three element-wise
    ops over the tensor, which torch.compile fuses; no Python loop over rows."""
    # The inf-norm is max |v| in one reduction; only the (rows, 1) result is widened.
    absmax = torch.linalg.vector_norm(values, ord=math.inf, dim=-1, keepdim=True).float()
    scale = absmax.clamp(min=_MIN_ABSMAX) / INT8_MAX
    # bf16 / float32 promotes to float32, so each value is rounded once. |v| / scale is at
    # most 127 * (1 + 2**-23): round() gives 127 at most, the clamp only rules out -128.
    quantized = (values / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized, scale


def smoothing_factors(
    act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """SmoothQuant's per-input-channel s_j = max|X_j|^alpha / max|W[:, j]|^(1 - alpha).

    `act_absmax`: (in_features,) from a calibration pass; `weight`: (out, in). Channels
    where either maximum is 0 (nothing to migrate) get 1. alpha = 0.5 splits the range
    evenly between activation and weight (the paper's default for most models).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    activation = act_absmax.detach().float().to(weight.device)
    if activation.shape != (weight.shape[1],):
        raise ValueError(f"act_absmax must be ({weight.shape[1]},), got {tuple(activation.shape)}")
    weight_max = weight.detach().float().abs().amax(dim=0)
    factors = activation.pow(alpha) / weight_max.pow(1.0 - alpha)
    usable = (activation > 0) & (weight_max > 0) & torch.isfinite(factors)
    return torch.where(usable, factors, torch.ones_like(factors)).clamp(*_SMOOTH_RANGE)


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight and per-token int8 activations (W8A8).

    Buffers (kept in their dtypes when the model is cast, see ``_apply``):
      * ``weight_int8``: (out_features, in_features) int8, row-major; its ``.t()`` is the
        column-major (in, out) mat2 torch._int_mm takes without a copy;
      * ``weight_scale``: (1, out_features) float32;
      * ``smooth``: (in_features,) float32 SmoothQuant divisors of the input, or None.
    Parameter ``bias``: (out_features,) in the original layer's dtype, or None.
    """

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    smooth: torch.Tensor | None
    bias: nn.Parameter | None

    def __init__(
        self,
        weight_int8: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        smooth: torch.Tensor | None = None,
    ) -> None:
        """Wrap already quantized tensors; use Int8Linear.from_linear to build one."""
        super().__init__()
        if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2:
            raise ValueError("weight_int8 must be a 2D torch.int8 tensor")
        self.out_features, self.in_features = (int(size) for size in weight_int8.shape)
        if weight_scale.dtype != torch.float32 or weight_scale.shape != (1, self.out_features):
            raise ValueError(f"weight_scale must be (1, {self.out_features}) float32")
        if smooth is not None and (
            smooth.dtype != torch.float32 or smooth.shape != (self.in_features,)
        ):
            raise ValueError(f"smooth must be ({self.in_features},) float32")
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("weight_scale", weight_scale.contiguous())
        self.register_buffer("smooth", None if smooth is None else smooth.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # Decided here and on every device move, not per call (see FP8Linear).
        self._use_kernel = self._kernel_takes(weight_int8.device)
        self._pad_rows = weight_int8.device.type == "cuda"  # only cuBLAS needs > 16 rows

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        act_absmax: torch.Tensor | None = None,
        alpha: float = 0.5,
    ) -> Int8Linear:
        """Quantize `linear`'s weight once (per output row); keep its bias as it is.

        With `act_absmax` (the layer's per-input-channel max |x| from a calibration pass)
        the weight is first smoothed (SmoothQuant, `smoothing_factors(act_absmax, W, alpha)`).
        """
        with torch.no_grad():
            weight = linear.weight.detach().float()  # exact for bf16/fp16 weights
            smooth = None
            if act_absmax is not None:
                smooth = smoothing_factors(act_absmax, weight, alpha)
                weight = weight * smooth  # column j scaled by s_j; the input is divided
            weight_int8, row_scale = quantize_rows(weight)
            bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(weight_int8, row_scale.reshape(1, -1), bias, smooth=smooth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected (..., {self.in_features}) input, got {tuple(x.shape)}")
        leading = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if self.smooth is not None:
            rows = rows / self.smooth  # float32: the division is not rounded to bf16 first
        x_int8, x_scale = quantize_rows(rows)
        # _int_mm needs a row-major mat1 (a no-op for the usual contiguous input).
        x_int8 = x_int8.contiguous()
        acc = self._int_mm(x_int8) if self._use_kernel else self._emulate(x_int8)
        out = acc.float() * x_scale * self.weight_scale
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*leading, self.out_features)

    def _int_mm(self, x_int8: torch.Tensor) -> torch.Tensor:
        """int8 x int8 -> exact int32 sums through torch._int_mm."""
        rows = x_int8.shape[0]
        if self._pad_rows and rows < _INT_MM_MIN_ROWS:
            padded = x_int8.new_zeros((_INT_MM_PADDED_ROWS, self.in_features))
            padded[:rows] = x_int8
            acc: torch.Tensor = torch._int_mm(padded, self.weight_int8.t())
            return acc[:rows]
        result: torch.Tensor = torch._int_mm(x_int8, self.weight_int8.t())
        return result

    def _emulate(self, x_int8: torch.Tensor) -> torch.Tensor:
        """The kernel's int32 sums, from a float64 matmul of the int8 values.

        float64 represents every partial sum exactly (|sum| <= K * 127**2 < 2**53 for any K
        a model has), so the result is the integer the kernel computes, and the conversion
        to int32 is exact while K * 127**2 < 2**31 (K < 133,000), the kernel's own limit.
        float32 would be exact only while K * 127**2 < 2**24, i.e. K < 1040: a 7B model's
        4096- and 11008-wide layers would round. (CPU int32 matmul is exact too but ~5x
        slower than float64 BLAS, and CUDA has no int32 matmul at all.)
        """
        product = x_int8.double() @ self.weight_int8.double().t()
        return product.to(torch.int32)

    def _kernel_takes(self, device: torch.device) -> bool:
        if not int_mm_available(device):
            return False
        if device.type == "cuda":
            return (
                self.in_features % _INT_MM_MULTIPLE == 0
                and self.out_features % _INT_MM_MULTIPLE == 0
            )
        return True  # the CPU kernel takes any shape

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        """Follow device moves, but keep the float32 scales (and smoothing) in float32.

        model.to(torch.bfloat16) casts every floating-point buffer: it would round the scales
        to 8 bits of mantissa. (The int8 weight is not floating point and is never cast.)
        """
        names = ("weight_int8", "weight_scale", "smooth")
        apply_moving_only(self, fn, recurse, names, super()._apply)
        self._use_kernel = self._kernel_takes(self.weight_int8.device)
        self._pad_rows = self.weight_int8.device.type == "cuda"
        return self

    def extra_repr(self) -> str:
        """Shown by print(model)."""
        kernel = "int_mm" if self._use_kernel else "emulated"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, smooth={self.smooth is not None}, kernel={kernel}"
        )


def quantize_language_model_int8(
    model: nn.Module,
    *,
    act_absmax: Mapping[str, torch.Tensor] | None = None,
    alpha: float = 0.5,
    min_features: int = DEFAULT_MIN_FEATURES,
) -> int:
    """Replace the LLaVA language model's nn.Linear layers with Int8Linear, in place.

    The layers are those of consumer.engine.linears (the lm_head, vision tower and projector
    stay as they are). `act_absmax`, by dotted layer name inside the language model (as
    `linears.record_inputs` returns it), turns SmoothQuant on for the layers it names.
    Returns how many layers were replaced.
    """
    stats = act_absmax or {}
    return replace_linears(
        model,
        lambda name, linear: Int8Linear.from_linear(
            linear, act_absmax=stats.get(name), alpha=alpha
        ),
        min_features=min_features,
    )
