"""Opt-in FP8 (float8 e4m3) inference for the language model's linear layers of a LLaVA.

What is quantized
    Every ``nn.Linear`` inside the LLaVA's language model (attention q/k/v/o projections and
    the MLP gate/up/down projections of every decoder layer): both the weight and the input
    activations become ``torch.float8_e4m3fn`` with one float32 scale per row:

    * weight: one scale per output feature (``absmax(row) / 448``), quantized once by
      ``FP8Linear.from_linear`` when the model is loaded, never again;
    * activation: one scale per token (``absmax(token) / 448``), computed on every call with
      vectorised tensor ops (no Python loop over rows).

    On CUDA GPUs of compute capability >= 8.9 (Ada, Hopper) the product runs on the FP8
    tensor cores through ``torch._scaled_mm`` with row-wise scaling: the kernel multiplies
    the fp8 operands, accumulates in float32 and applies ``scale_a[i] * scale_b[j]`` (and the
    bias) in its epilogue, writing the activation's dtype. Elsewhere (CPU, tests, GPUs
    without FP8) an emulation does the *same* quantization, then multiplies the dequantized
    operands in float32, so its numbers match the GPU's up to the order of accumulation.
    These layers hold the bulk of a 7B LLaVA's weights and FLOPs, which is where FP8 halves
    the weight memory traffic and doubles the tensor-core rate compared with bf16.

What is not quantized, and why
    * ``lm_head``: the label probabilities the worker publishes are read straight from its
      logits at the last position, a single row per face, so FP8 there would cost accuracy
      exactly where it is measured while saving almost nothing (the engine already computes
      only the last position's logits).
    * the vision tower and the multi-modal projector: they run once per image (a CLIP ViT and
      a two-layer MLP, a small share of the FLOPs next to the language model over ~600
      tokens), and their outputs become the image-token embeddings that every later layer
      attends to, so their errors would propagate through the whole language model.
    * embeddings, norms, rotary tables, attention softmax: not ``nn.Linear``; they stay in the
      model dtype.
    * layers whose in- or out-features are below ``min_features``: too small to gain anything.

Expected accuracy cost
    e4m3 keeps 3 mantissa bits, so each value is rounded by at most 2**-4 = 6.25% relative,
    about 2.6% RMS. Rounding both operands of a dot product gives a relative output error of
    about sqrt(2) * 2.6% = 3.7% per layer; the unit tests measure 3.7% on Gaussian data and
    3.4-3.6% for every layer inside the test LLaVA on real faces. How much of that reaches
    the label logits depends on how strongly the model amplifies perturbations. The tiny
    random test LLaVA amplifies them ~7x (random q/k weights saturate its attention; bf16
    alone already moves its logits by 3.4%): FP8 changes its last-position logits by 27% on
    average and keeps the argmax label for 18 of 21 real FER faces, the same as injecting
    3.6% Gaussian noise into every linear output. A trained model is far better conditioned:
    on the shipped FER model (emulated on the CPU) FP8 keeps the float32 label of all 404
    committed faces, with at most 0.031 change in a probability and a last-position hidden
    state cosine >= 0.9996. Check a large checkpoint's own agreement (`eval --compare
    precision=bf16 precision=fp8`) before relying on it. ``model.precision = "fp8"`` asks
    for it; ``"auto"`` takes it only where a start-up check shows it pays (precision.py).

This path is for inference only: ``FP8Linear`` has no trainable weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Self

import torch
from torch import nn

from consumer.engine.linears import DEFAULT_MIN_FEATURES, apply_moving_only, replace_linears

__all__ = ["FP8Linear", "fp8_supported", "quantize_language_model"]

FP8_DTYPE = torch.float8_e4m3fn
# 448: the largest finite e4m3fn value; absmax maps onto it so no value saturates.
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
# Floor for a row's absmax before it becomes a scale: an all-zero row (padding, a zeroed
# token) would otherwise give scale 0 and 0/0 = NaN. Rows below it share this floor scale
# (values under ~4e-18 become 0), harmless at that size.
_MIN_ABSMAX = 1e-12
# torch._scaled_mm needs the contraction dim (in_features) and both dims of the weight to be
# multiples of 16 (checked in ATen's _scaled_mm_out_cuda); other shapes use the emulation.
_SCALED_MM_MULTIPLE = 16
# Output dtypes for which the kernel can add a bias itself; float32 output takes no bias
# ("Bias is not supported when out_dtype is set to Float32"), so it is added afterwards.
_FUSED_BIAS_DTYPES = (torch.bfloat16, torch.float16)


def fp8_supported(device: torch.device) -> bool:
    """True only for a CUDA device of compute capability >= 8.9 with torch._scaled_mm.

    ROCm builds also report device type "cuda", but their MI300 FP8 format is e4m3fnuz,
    not the e4m3fn used here, so they are excluded.
    """
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    if torch.version.hip is not None or not torch.cuda.is_available():
        return False
    capability: tuple[int, int] = torch.cuda.get_device_capability(device)
    return capability >= (8, 9)


def _quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax quantization of a 2D tensor: (float8 e4m3 values, (rows, 1) float32 scales).

    values ~= fp8.float() * scale. Three passes over the big tensor (max-abs, divide, cast),
    which torch.compile fuses into one; no Python loop over rows.
    """
    # The inf-norm is max |v| in one reduction, exact in any dtype; only the (rows, 1) result
    # is widened to float32, not the whole tensor.
    absmax = torch.linalg.vector_norm(values, ord=math.inf, dim=-1, keepdim=True).float()
    scale = absmax.clamp(min=_MIN_ABSMAX) / FP8_MAX
    # bf16/fp16 / float32 promotes to float32, so each value is rounded once (to fp8), not
    # twice. No clamp is needed: |v| / scale <= 448 * (1 + 2**-22) after float32 rounding,
    # and the nearest e4m3fn value to anything below 464 is 448 (480 would be the NaN code).
    quantized = (values / scale).to(FP8_DTYPE)
    return quantized, scale


class FP8Linear(nn.Module):
    """A linear layer with a float8 e4m3 weight and per-token float8 activations.

    Buffers (kept in their dtypes when the model is cast, see ``_apply``):
      * ``weight_fp8``: (out_features, in_features) float8_e4m3fn, row-major. Its ``.t()`` is
        the column-major (in_features, out_features) matrix torch._scaled_mm wants as mat2,
        so no copy is made per call.
      * ``weight_scale``: (1, out_features) float32, contiguous: the ``scale_b`` of row-wise
        scaling as is.
    Parameter ``bias``: (out_features,) in the original layer's dtype, or None.
    """

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    bias: nn.Parameter | None

    def __init__(
        self,
        weight_fp8: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        use_fast_accum: bool = False,
    ) -> None:
        """Wrap already quantized tensors; use FP8Linear.from_linear to build one."""
        super().__init__()
        if weight_fp8.dtype != FP8_DTYPE or weight_fp8.dim() != 2:
            raise ValueError(f"weight_fp8 must be a 2D {FP8_DTYPE} tensor")
        self.out_features, self.in_features = (int(size) for size in weight_fp8.shape)
        if weight_scale.dtype != torch.float32 or weight_scale.shape != (1, self.out_features):
            raise ValueError(f"weight_scale must be (1, {self.out_features}) float32")
        # fast accumulation: faster on Hopper, but accumulates in reduced precision; off so
        # the label logits lose no more than the fp8 rounding itself costs.
        self.use_fast_accum = use_fast_accum
        self.register_buffer("weight_fp8", weight_fp8.contiguous())
        self.register_buffer("weight_scale", weight_scale.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._shape_ok = (
            self.in_features % _SCALED_MM_MULTIPLE == 0
            and self.out_features % _SCALED_MM_MULTIPLE == 0
        )
        # Decided here and on every device move (not per call), so forward is one attribute
        # read that torch.compile can guard on instead of a CUDA capability query.
        self._use_kernel = self._shape_ok and fp8_supported(weight_fp8.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, use_fast_accum: bool = False) -> FP8Linear:
        """Quantize `linear`'s weight once (per output row) and keep its bias as it is."""
        with torch.no_grad():
            weight_fp8, row_scale = _quantize_rows(linear.weight.detach())
            bias = None if linear.bias is None else linear.bias.detach().clone()
        # (out, 1) -> (1, out): the layout of scale_b for row-wise scaling.
        weight_scale = row_scale.reshape(1, -1).contiguous()
        return cls(weight_fp8, weight_scale, bias, use_fast_accum=use_fast_accum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features), in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected (..., {self.in_features}) input, got {tuple(x.shape)}")
        leading = x.shape[:-1]
        x_fp8, x_scale = _quantize_rows(x.reshape(-1, self.in_features))
        # A non-contiguous input keeps its strides through the element-wise ops, but the
        # kernel needs a row-major mat1 (a no-op in the usual contiguous case).
        x_fp8 = x_fp8.contiguous()
        # The weight's device decides (x must be on it anyway): one attribute read.
        if self._use_kernel:
            out = self._scaled_mm(x_fp8, x_scale, x.dtype)
        else:
            out = self._emulate(x_fp8, x_scale, x.dtype)
        return out.reshape(*leading, self.out_features)

    def _scaled_mm(
        self, x_fp8: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """FP8 tensor-core GEMM with row-wise scales; the bias is fused where the kernel can."""
        bias = self.bias
        fuse_bias = bias is not None and out_dtype in _FUSED_BIAS_DTYPES and bias.dtype == out_dtype
        out: torch.Tensor = torch._scaled_mm(
            x_fp8,  # (rows, in) row-major float8_e4m3fn
            self.weight_fp8.t(),  # (in, out) column-major float8_e4m3fn
            scale_a=x_scale,  # (rows, 1) float32, contiguous
            scale_b=self.weight_scale,  # (1, out) float32, contiguous
            bias=bias if fuse_bias else None,
            out_dtype=out_dtype,
            use_fast_accum=self.use_fast_accum,
        )
        if bias is not None and not fuse_bias:
            out = out + bias.to(out_dtype)
        return out

    def _emulate(
        self, x_fp8: torch.Tensor, x_scale: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """The kernel's arithmetic in float32: fp8 x fp8 products, then scales, then bias."""
        product = x_fp8.float() @ self.weight_fp8.float().t()
        out = product * x_scale * self.weight_scale
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(out_dtype)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Self:
        """Follow device moves, but keep the fp8 weight and float32 scales in their dtypes.

        nn.Module.to(dtype) / .half() / .bfloat16() cast every floating-point buffer, and
        float8 counts as floating point: model.to(torch.bfloat16) would otherwise silently
        turn the weight back into bf16 and round the scales.
        """
        apply_moving_only(self, fn, recurse, ("weight_fp8", "weight_scale"), super()._apply)
        self._use_kernel = self._shape_ok and fp8_supported(self.weight_fp8.device)
        return self

    def extra_repr(self) -> str:
        """Shown by print(model)."""
        kernel = "scaled_mm" if self._use_kernel else "emulated"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, kernel={kernel}"
        )


def quantize_language_model(
    model: nn.Module, *, min_features: int = DEFAULT_MIN_FEATURES, use_fast_accum: bool = False
) -> int:
    """Replace the LLaVA language model's nn.Linear layers with FP8Linear, in place.

    Layers with in_features or out_features below `min_features`, the lm_head, the vision
    tower and the multi-modal projector are left alone (consumer.engine.linears). Returns
    how many layers were replaced (a layer shared by several parents counts once). Works on
    any device; on CPU the FP8Linear forward is emulated. Call it after the model is on its
    device and in its dtype (casting later is safe too: FP8Linear keeps its fp8 weight when
    the model is cast).
    """
    return replace_linears(
        model,
        lambda _, linear: FP8Linear.from_linear(linear, use_fast_accum=use_fast_accum),
        min_features=min_features,
    )
