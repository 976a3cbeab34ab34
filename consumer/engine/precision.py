"""Which quantization the language model's linear layers get: `model.precision` resolved.

    requested     device                          result
    none / bf16   any                             none (the layers stay in model.dtype)
    fp8           CUDA, compute capability 8.9+   fp8
    fp8           anything else                   PrecisionError naming model.precision
    int8          CUDA                            int8 (torch._int_mm, cuBLAS)
    int8          CPU                             int8 (torch._int_mm's CPU kernel), with a
                                                  warning: not benchmarked there; for tests
                                                  and accuracy checks
    auto          CPU, or no CUDA capability      none: today's behaviour
    auto          capability 8.9+ (Ada, Hopper)   fp8 if the micro-benchmark shows it faster
    auto          capability 8.0-8.8 (A100, A10)  int8 if the fidelity check passes and the
                                                  micro-benchmark shows it faster
    auto          older GPUs                      none

The two start-up checks, run only by `auto` on a GPU and only for the candidate:
  * fidelity (int8 only): up to CHECK_LAYERS of the model's own linear layers, spread over
    its depth, are quantized exactly as they would be, and their outputs on real activations
    (recorded during one forward of the calibration batch) compared with the unquantized
    layers'; the worst cosine must be >= MIN_COSINE. int8's error depends on the data (a few
    outlier channels cost every other channel its resolution), so it is measured. fp8's does
    not: e4m3 rounds every value by at most 2**-4 relative whatever its magnitude (~3.7%
    per layer, see fp8.py), so a check would only re-measure the format.
  * speed: every distinct (in, out) shape of the language model's linear layers, at the
    engine's tokens per batch, through the quantized layer (activation quantization
    included) against F.linear in the model's dtype, weighted by how many layers have that
    shape; the quantized total must be MIN_SPEEDUP times faster. Timed eagerly: the engine
    compiles on CUDA, which fuses the quantization's element-wise ops, so the check
    understates the gain rather than overstating it. Quantizing activations costs a fixed
    amount per value, so narrow layers lose: the shipped 64-wide model's run at 0.1-0.2x
    in int8 or fp8 on the CPU, and auto is expected to keep it unquantized on a GPU too.

A benchmark is noisy: workers of one consumer group could choose differently when the gain
is near the threshold. Every choice is logged with its numbers; pin `model.precision` when
identical numerics across replicas matter.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import structlog
import torch
from torch import nn
from torch.nn import functional

from consumer.engine.fp8 import FP8Linear
from consumer.engine.fp8 import quantize_language_model as quantize_fp8
from consumer.engine.int8 import Int8Linear, quantize_language_model_int8
from consumer.engine.linears import LayerInputs, language_model_linears, record_inputs
from consumer.engine.loader import ModelLoadError

__all__ = [
    "PrecisionChoice",
    "PrecisionError",
    "choose_precision",
    "cuda_capability",
    "linear_speedup",
    "min_cosine",
    "resolve_precision",
]

Precision = Literal["none", "fp8", "int8"]
Capability = Callable[[torch.device], tuple[int, int] | None]

MIN_COSINE = 0.999
# Required gain: 5% above parity, so that timing noise alone does not flip the choice.
MIN_SPEEDUP = 1.05
FP8_CAPABILITY = (8, 9)
INT8_CAPABILITY = (8, 0)
CHECK_LAYERS = 16
SAMPLE_ROWS = 256
# Most token rows the speed check multiplies at once, bounding its memory on a large model.
MAX_BENCH_ROWS = 8192
# SmoothQuant's migration strength for the engine's int8 layers (int8.py).
SMOOTH_ALPHA = 0.5

log = structlog.get_logger("consumer.engine.precision")


class PrecisionError(ModelLoadError):
    """model.precision asks for what this device cannot do; the message names the fix."""


@dataclass(frozen=True, slots=True)
class PrecisionChoice:
    """The precision the engine runs, why, and the start-up measurements behind it."""

    precision: Precision
    reason: str
    min_cosine: float | None = None
    speedup: float | None = None


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device; None for the CPU, ROCm (other FP8 format) or no GPU."""
    if device.type != "cuda" or torch.version.hip is not None or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


def resolve_precision(
    requested: str,
    device: torch.device,
    *,
    capability: Capability = cuda_capability,
    self_check: Callable[[Precision], float],
    micro_benchmark: Callable[[Precision], float],
) -> PrecisionChoice:
    """Apply the table in this module's docstring. The probes are called only by `auto`, on
    a GPU, for its one candidate: `self_check(p)` returns the worst cosine of quantized vs
    unquantized layer outputs, `micro_benchmark(p)` the speed-up over the base dtype."""
    cap = capability(device)
    where = str(device) if cap is None else f"{device} (compute capability {cap[0]}.{cap[1]})"
    if requested in ("none", "bf16"):
        return PrecisionChoice("none", f'model.precision = "{requested}": no quantization')
    if requested == "fp8":
        if cap is None or cap < FP8_CAPABILITY or not hasattr(torch, "_scaled_mm"):
            raise PrecisionError(
                'model.precision = "fp8" needs a CUDA GPU of compute capability 8.9 or newer '
                f'(Ada, Hopper); this worker runs on {where}. Set model.precision = "auto" '
                '(int8 where it passes its checks on an A100) or "bf16" (no quantization)'
            )
        return PrecisionChoice("fp8", f'model.precision = "fp8" on {where}')
    if requested == "int8":
        note = " (CPU kernel, not benchmarked: for tests)" if device.type == "cpu" else ""
        return PrecisionChoice("int8", f'model.precision = "int8" on {where}{note}')
    if requested != "auto":
        raise PrecisionError(
            f"model.precision = {requested!r} is unknown; use auto, bf16, none, fp8 or int8"
        )
    if cap is None:
        return PrecisionChoice("none", f"auto on {where}: quantization is for CUDA GPUs only")
    if cap >= FP8_CAPABILITY:
        candidate: Precision = "fp8"
    elif cap >= INT8_CAPABILITY:
        candidate = "int8"
    else:
        return PrecisionChoice("none", f"auto on {where}: no fp8, and int8 is for 8.0+ only")
    cosine = None
    if candidate == "int8":
        cosine = self_check(candidate)
        if cosine < MIN_COSINE:
            return PrecisionChoice(
                "none",
                f"auto on {where}: int8 failed the fidelity check (worst layer cosine "
                f"{cosine:.5f} < {MIN_COSINE})",
                min_cosine=cosine,
            )
    speedup = micro_benchmark(candidate)
    if speedup < MIN_SPEEDUP:
        return PrecisionChoice(
            "none",
            f"auto on {where}: {candidate} is {speedup:.2f}x the base dtype's speed on this "
            f"model's linear layers (needs {MIN_SPEEDUP}x)",
            min_cosine=cosine,
            speedup=speedup,
        )
    checked = "" if cosine is None else f", worst layer cosine {cosine:.5f}"
    return PrecisionChoice(
        candidate,
        f"auto on {where}: {candidate} is {speedup:.2f}x faster on this model's linear "
        f"layers{checked}",
        min_cosine=cosine,
        speedup=speedup,
    )


def _build(precision: Precision, linear: nn.Linear, act_absmax: torch.Tensor | None) -> nn.Module:
    """The layer `linear` becomes under `precision` (what quantize() would put there)."""
    if precision == "fp8":
        return FP8Linear.from_linear(linear)
    if precision == "int8":
        return Int8Linear.from_linear(linear, act_absmax=act_absmax, alpha=SMOOTH_ALPHA)
    return linear


def spread(names: Sequence[str], count: int) -> list[str]:
    """Up to `count` names evenly spaced over `names`, first and last included."""
    if len(names) <= count:
        return list(names)
    picks = {round(i * (len(names) - 1) / (count - 1)) for i in range(count)}
    return [names[i] for i in sorted(picks)]


def min_cosine(
    linears: Mapping[str, nn.Linear], inputs: LayerInputs, precision: Precision
) -> float:
    """The worst cosine similarity, over the sampled layers, between each layer's output on
    its recorded input rows and the output of its `precision` version (1.0: none sampled)."""
    worst = 1.0
    with torch.inference_mode():
        for name, x in inputs.samples.items():
            linear = linears[name]
            reference = linear(x).float().flatten()
            quantized = _build(precision, linear, inputs.absmax.get(name))(x).float().flatten()
            cosine = float(functional.cosine_similarity(quantized, reference, dim=0))
            worst = min(worst, cosine)
    return worst


def _median_seconds(layer: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median wall time of layer(x), the device synchronised around each call."""

    def sync() -> None:
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    for _ in range(2):  # kernel selection, allocator warm-up
        layer(x)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        layer(x)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def linear_speedup(
    linears: Mapping[str, nn.Linear],
    precision: Precision,
    *,
    rows: int,
    act_absmax: Mapping[str, torch.Tensor] | None = None,
    repeats: int = 5,
) -> float:
    """Time of the unquantized layers / time of their `precision` versions, at `rows` tokens.

    One layer per distinct (in, out) shape is timed (the model's own weights, on their
    device, in their dtype, with random inputs: speed does not depend on the values), and
    each shape counts as often as the model has it. With `act_absmax` an int8 layer is
    built smoothed, as it will run. 1.0 when there is nothing to time.
    """
    by_shape: dict[tuple[int, int], tuple[str, int]] = {}
    for name, linear in linears.items():
        shape = (linear.in_features, linear.out_features)
        first, count = by_shape.get(shape, (name, 0))
        by_shape[shape] = (first, count + 1)
    stats = act_absmax or {}
    rows = max(1, min(rows, MAX_BENCH_ROWS))
    base_total = quantized_total = 0.0
    with torch.inference_mode():
        for (in_features, _), (name, count) in by_shape.items():
            linear = linears[name]
            weight = linear.weight
            x = torch.randn(rows, in_features, device=weight.device, dtype=weight.dtype)
            base_total += count * _median_seconds(linear, x, repeats)
            quantized_total += count * _median_seconds(
                _build(precision, linear, stats.get(name)), x, repeats
            )
    return base_total / quantized_total if quantized_total > 0 else 1.0


def quantize(
    model: nn.Module, precision: Precision, *, act_absmax: Mapping[str, torch.Tensor] | None
) -> int:
    """Put `precision` into the model's language-model linear layers; how many changed."""
    if precision == "fp8":
        return quantize_fp8(model)
    if precision == "int8":
        return quantize_language_model_int8(model, act_absmax=act_absmax, alpha=SMOOTH_ALPHA)
    return 0


def choose_precision(
    model: nn.Module,
    requested: str,
    device: torch.device,
    *,
    calibrate: Callable[[], object],
    rows: int,
    capability: Capability | None = None,
) -> tuple[PrecisionChoice, int]:
    """Resolve `requested`, quantize the model accordingly, log why; (choice, layers).

    `calibrate()` runs one forward of the unquantized model on a calibration batch; it is
    called at most once, and only when int8 (SmoothQuant statistics, fidelity check) needs
    the activations it records. `rows`: the tokens of one full batch, for the speed check.
    `capability`: default `cuda_capability`, looked up per call so tests can replace it.
    """
    linears = language_model_linears(model)
    recorded: list[LayerInputs] = []

    def inputs() -> LayerInputs:
        if not recorded:
            names = spread(list(linears), CHECK_LAYERS)
            recorded.append(
                record_inputs(model, calibrate, sample_rows=SAMPLE_ROWS, sample_names=names)
            )
        return recorded[0]

    choice = resolve_precision(
        requested,
        device,
        capability=capability or cuda_capability,
        self_check=lambda p: min_cosine(linears, inputs(), p),
        micro_benchmark=lambda p: linear_speedup(
            linears, p, rows=rows, act_absmax=inputs().absmax if p == "int8" else None
        ),
    )
    act_absmax = inputs().absmax if choice.precision == "int8" else None
    layers = quantize(model, choice.precision, act_absmax=act_absmax)
    fields = {
        "requested": requested,
        "precision": choice.precision,
        "quantized_layers": layers,
        "reason": choice.reason,
        "min_cosine": choice.min_cosine,
        "speedup": choice.speedup,
    }
    if choice.precision == "int8" and device.type == "cpu":
        log.warning("int8 on the CPU is for tests and accuracy checks", **fields)
    else:
        log.info("precision chosen", **fields)
    return choice, layers
