"""FP8 (e4m3, per-row scales) linear layers for the LLaVA language model, on the CPU.

CI has no GPU, so the CUDA path is exercised on the CPU: torch._scaled_mm has a CPU
implementation in torch 2.15, and a recorder checks every call against the layout, shape
and dtype rules the CUDA kernel enforces.

Error bounds, and why:
  * one layer: e4m3 rounds each value by <= 2**-4 relative (~2.6% RMS); rounding both
    operands gives ~sqrt(2) * 2.6% = 3.7% relative output error, measured 3.65-3.74% over 20
    seeds on Gaussian data without bias (less with a bias, which is not quantized). Bound: 5%.
  * the tiny LLaVA: its random weights (init range 0.3) saturate attention, so it amplifies
    any per-layer perturbation ~7x: bf16 alone moves its logits 3.4%, and 3.6% Gaussian noise
    on every linear output moves them 25-29% with 15-18 of 21 argmax labels kept. FP8
    measured: every layer 3.4-3.6% in place, logits 26.7% mean / 48% max relative change,
    18 of 21 labels kept. Bounds: per layer 5%, logits 40% mean / 70% max, >= 16 of 21.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from consumer.config import DEFAULT_PROMPT, FER_LABELS
from consumer.engine import fp8 as fp8_module
from consumer.engine import make_tiny_checkpoint
from consumer.engine.fp8 import FP8Linear, fp8_supported, quantize_language_model
from consumer.engine.scoring import label_token_ids
from tests.conftest import FER_FACES
from tests.support.layers import random_linear, relative_error

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYER_BOUND = 0.05
MIN_FEATURES = 8  # the tiny model's smallest language-model layer is 64 wide


# --- one layer ----------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(37, 256), (3, 11, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_close_to_the_float_linear(bias: bool, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    linear = random_linear(1, 256, 192, bias=bias)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    reference = linear(x)  # float32 weights and inputs
    out = FP8Linear.from_linear(linear)(x.to(dtype))
    assert out.dtype == dtype
    assert out.shape == (*shape[:-1], 192)
    assert torch.isfinite(out).all()
    error = relative_error(out, reference)
    assert 0.005 < error < LAYER_BOUND  # > 0.005: it really is quantized


def test_bf16_layer_keeps_its_bias_dtype() -> None:
    linear = random_linear(3, 64, 32, bias=True).to(torch.bfloat16)
    layer = FP8Linear.from_linear(linear)
    assert layer.bias is not None and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.bias, linear.bias)
    x = torch.randn(4, 64).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, linear.float()(x.float())) < LAYER_BOUND


def test_error_over_seeds_matches_e4m3_theory() -> None:
    errors = []
    for seed in range(5):
        linear = random_linear(seed, 256, 192, bias=False)
        x = torch.randn(64, 256, generator=torch.Generator().manual_seed(100 + seed))
        errors.append(relative_error(FP8Linear.from_linear(linear)(x), linear(x)))
    # sqrt(2) * 2.6% RMS rounding of each operand; measured 3.65-3.74%.
    assert all(0.03 < error < LAYER_BOUND for error in errors), errors


def test_weight_is_stored_as_fp8_with_float32_row_scales() -> None:
    linear = random_linear(4, 96, 48, bias=True)
    layer = FP8Linear.from_linear(linear)
    assert (layer.in_features, layer.out_features) == (96, 48)
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn
    assert layer.weight_fp8.shape == (48, 96)
    # .t() is the column-major (in, out) mat2 torch._scaled_mm wants: no copy per call.
    assert layer.weight_fp8.t().stride() == (1, 96)
    assert layer.weight_scale.dtype == torch.float32
    assert layer.weight_scale.shape == (1, 48) and layer.weight_scale.is_contiguous()
    assert layer.bias is not None and layer.bias.dtype == torch.float32
    assert not any(parameter.requires_grad for parameter in layer.parameters())
    # Each row's absmax maps onto e4m3's 448 and so comes back exactly.
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    assert layer.weight_fp8.float().abs().amax(dim=1).eq(fp8_max).all()
    dequantized = layer.weight_fp8.float() * layer.weight_scale.t()
    torch.testing.assert_close(
        dequantized.abs().amax(dim=1), linear.weight.abs().amax(dim=1), rtol=1e-6, atol=0
    )
    # Round to nearest with 3 mantissa bits: at most half an ulp, 2**-4 of the value.
    assert ((dequantized - linear.weight).abs() <= linear.weight.abs() / 16 + 1e-9).all()


def test_model_casts_keep_the_fp8_weight_and_float32_scales() -> None:
    model = nn.Sequential(FP8Linear.from_linear(random_linear(5, 32, 32, bias=True)))
    model.to(torch.bfloat16)
    layer = model[0]
    assert isinstance(layer, FP8Linear)
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn
    assert layer.weight_scale.dtype == torch.float32
    assert layer.bias is not None and layer.bias.dtype == torch.bfloat16  # follows the model
    assert model(torch.randn(2, 32).to(torch.bfloat16)).dtype == torch.bfloat16


def test_zero_rows_give_finite_outputs() -> None:
    layer = FP8Linear.from_linear(random_linear(6, 64, 32, bias=True))
    x = torch.randn(5, 64)
    x[1] = 0.0
    out = layer(x)
    assert torch.isfinite(out).all()
    assert layer.bias is not None
    torch.testing.assert_close(out[1], layer.bias.detach())  # 0 @ W + b
    assert torch.isfinite(layer(torch.zeros(3, 64))).all()
    assert torch.isfinite(layer(torch.zeros(3, 64, dtype=torch.bfloat16))).all()
    # A zero weight row too.
    zeroed = random_linear(7, 64, 32, bias=False)
    with torch.no_grad():
        zeroed.weight[3] = 0.0
    out = FP8Linear.from_linear(zeroed)(x)
    assert torch.isfinite(out).all() and out[:, 3].eq(0).all()


def test_row_maxima_land_on_448_without_nan_at_any_magnitude() -> None:
    generator = torch.Generator().manual_seed(11)
    exponents = torch.randint(-40, 40, (4000, 1), generator=generator).float()
    x = torch.randn(4000, 64, generator=generator) * torch.exp2(exponents)
    layer = FP8Linear.from_linear(random_linear(12, 64, 16, bias=False))
    for dtype in (torch.float32, torch.bfloat16):
        quantized, scale = fp8_module._quantize_rows(x.to(dtype))
        assert quantized.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        assert quantized.float().abs().amax(dim=-1).eq(448).all()  # no NaN, no overflow
        assert torch.isfinite(layer(x.to(dtype))).all()


def test_fp8_supported_is_false_on_cpu() -> None:
    assert fp8_supported(torch.device("cpu")) is False
    assert fp8_supported(torch.device("meta")) is False


# --- the torch._scaled_mm path, run on the CPU ---------------------------------------------


def _check_cuda_contract(call: dict[str, Any]) -> None:
    """The rules ATen's _scaled_mm_out_cuda enforces for row-wise scaling (CPU checks fewer)."""
    mat1, mat2 = call["mat1"], call["mat2"]
    scale_a, scale_b = call["scale_a"], call["scale_b"]
    out_dtype, bias = call["out_dtype"], call["bias"]
    rows, inner = mat1.shape
    assert mat1.dtype == mat2.dtype == torch.float8_e4m3fn
    assert mat1.stride() == (inner, 1)  # row-major
    assert mat2.stride() == (1, mat2.shape[0])  # column-major
    assert inner % 16 == 0 and mat2.shape[0] % 16 == 0 and mat2.shape[1] % 16 == 0
    assert scale_a.dtype == scale_b.dtype == torch.float32
    assert scale_a.shape == (rows, 1) and scale_a.is_contiguous()
    assert scale_b.shape == (1, mat2.shape[1]) and scale_b.is_contiguous()
    if bias is not None:
        assert out_dtype in (torch.bfloat16, torch.float16) and bias.dtype == out_dtype


@pytest.fixture
def scaled_mm_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Pretend the device has FP8 and record every torch._scaled_mm call (which still runs)."""
    calls: list[dict[str, Any]] = []
    real: Callable[..., torch.Tensor] = torch._scaled_mm

    def recording(mat1: torch.Tensor, mat2: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        calls.append({"mat1": mat1, "mat2": mat2, "bias": None, **kwargs})
        return real(mat1, mat2, **kwargs)

    monkeypatch.setattr(fp8_module, "fp8_supported", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", recording)
    yield calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_scaled_mm_path_matches_the_emulation(
    scaled_mm_calls: list[dict[str, Any]], dtype: torch.dtype, bias: bool
) -> None:
    linear = random_linear(8, 128, 64, bias=bias).to(dtype)
    kernel = FP8Linear.from_linear(linear)
    x = torch.randn(2, 9, 128, generator=torch.Generator().manual_seed(9)).to(dtype)
    # A non-contiguous input: the kernel needs mat1 row-major anyway.
    out = kernel(x.transpose(0, 1).contiguous().transpose(0, 1))
    assert len(scaled_mm_calls) == 1
    _check_cuda_contract(scaled_mm_calls[0])
    assert scaled_mm_calls[0]["out_dtype"] == dtype
    fused = scaled_mm_calls[0]["bias"] is not None
    assert fused == (bias and dtype != torch.float32)  # float32 output takes no fused bias
    emulated = copy.deepcopy(kernel)
    emulated._use_kernel = False
    expected = emulated(x)
    assert out.dtype == expected.dtype == dtype and out.shape == (2, 9, 64)
    # Same quantization both ways; only the accumulation order and the final rounding differ.
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert relative_error(out, expected) < tolerance


def test_scaled_mm_path_takes_a_transposed_2d_input(
    scaled_mm_calls: list[dict[str, Any]],
) -> None:
    linear = random_linear(13, 64, 32, bias=True).to(torch.bfloat16)
    x = torch.randn(64, 7).to(torch.bfloat16).t()  # (7, 64) with strides (1, 7)
    out = FP8Linear.from_linear(linear)(x)
    (call,) = scaled_mm_calls
    _check_cuda_contract(call)
    assert relative_error(out, linear.float()(x.float())) < LAYER_BOUND


def test_shapes_the_kernel_cannot_take_use_the_emulation(
    scaled_mm_calls: list[dict[str, Any]],
) -> None:
    for in_features, out_features in ((60, 64), (64, 40)):
        linear = random_linear(10, in_features, out_features, bias=True)
        x = torch.randn(3, in_features)
        out = FP8Linear.from_linear(linear)(x)
        assert out.shape == (3, out_features)
        assert relative_error(out, linear(x)) < LAYER_BOUND
    assert scaled_mm_calls == []
    FP8Linear.from_linear(random_linear(10, 64, 64, bias=False))(torch.randn(3, 64))
    assert len(scaled_mm_calls) == 1


# --- the tiny LLaVA -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    """(float32 LlavaForConditionalGeneration in eval mode, its processor)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("fp8") / "m")
    load_model: Any = LlavaForConditionalGeneration.from_pretrained  # untyped
    load_processor: Any = AutoProcessor.from_pretrained
    model = load_model(path, local_files_only=True).eval()
    return model, load_processor(path, local_files_only=True)


@pytest.fixture(scope="module")
def face_batch(tiny_llava: tuple[Any, Any]) -> dict[str, torch.Tensor]:
    """The prompt with 21 real FER faces, three per class, as the processor encodes them."""
    faces = []
    for class_dir in sorted(p for p in FER_FACES.iterdir() if p.is_dir()):
        for image_path in sorted(class_dir.glob("*.png"))[:3]:
            with Image.open(image_path) as image:
                faces.append(image.convert("RGB"))  # 48x48 grayscale
    assert len(faces) == 21
    prompt = DEFAULT_PROMPT.format(labels=", ".join(FER_LABELS))
    encoded: dict[str, torch.Tensor] = dict(
        tiny_llava[1](text=[prompt] * len(faces), images=faces, return_tensors="pt")
    )
    return encoded


def _linears(module: nn.Module, min_features: int) -> list[nn.Linear]:
    return [
        layer
        for layer in module.modules()
        if isinstance(layer, nn.Linear)
        and layer.in_features >= min_features
        and layer.out_features >= min_features
    ]


def test_quantizes_only_the_language_model(tiny_llava: tuple[Any, Any]) -> None:
    model = copy.deepcopy(tiny_llava[0])
    expected = len(_linears(model.model.language_model, MIN_FEATURES))
    assert expected == 14  # 2 decoder layers x (q, k, v, o, gate, up, down)
    untouched = {
        "vision tower": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
        "lm_head": model.lm_head,
    }
    before = {name: len(_linears(part, 1)) for name, part in untouched.items()}
    assert quantize_language_model(model, min_features=MIN_FEATURES) == expected
    assert len(_linears(model.model.language_model, 1)) == 0
    fp8_layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(fp8_layers) == expected
    assert all(not layer._use_kernel for layer in fp8_layers)  # CPU: emulated
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    for name, part in untouched.items():
        assert len(_linears(part, 1)) == before[name] > 0, name
        assert not any(isinstance(m, FP8Linear) for m in part.modules()), name
    # Nothing left to replace the second time.
    assert quantize_language_model(model, min_features=MIN_FEATURES) == 0


def test_min_features_leaves_small_layers(tiny_llava: tuple[Any, Any]) -> None:
    model = copy.deepcopy(tiny_llava[0])
    # gate/up are 64 -> 128 and down 128 -> 64: none has both sides >= 100.
    assert quantize_language_model(model, min_features=100) == 0
    assert not any(isinstance(m, FP8Linear) for m in model.modules())


def test_rejects_a_model_without_a_language_model() -> None:
    with pytest.raises(ValueError, match="language model"):
        quantize_language_model(nn.Sequential(nn.Linear(32, 32)))


def test_quantized_llava_stays_close_on_real_faces(
    tiny_llava: tuple[Any, Any], face_batch: dict[str, torch.Tensor]
) -> None:
    model, processor = tiny_llava
    quantized = copy.deepcopy(model)
    quantize_language_model(quantized, min_features=MIN_FEATURES)

    # Every FP8 layer against its float layer on the very activations it sees in the model.
    originals = dict(model.model.language_model.named_modules())
    layer_errors: dict[str, float] = {}

    def compare(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(_: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            layer_errors[name] = relative_error(output, originals[name](inputs[0]))

        return hook

    handles = [
        module.register_forward_hook(compare(name))
        for name, module in quantized.model.language_model.named_modules()
        if isinstance(module, FP8Linear)
    ]
    with torch.inference_mode():
        reference = model(**face_batch, logits_to_keep=1).logits[:, -1, :]
        logits = quantized(**face_batch, logits_to_keep=1).logits[:, -1, :]
    for handle in handles:
        handle.remove()
    assert len(layer_errors) == 14
    assert all(error < LAYER_BOUND for error in layer_errors.values()), layer_errors

    assert logits.dtype == reference.dtype == torch.float32
    assert torch.isfinite(logits).all()
    relative = (logits - reference).norm(dim=-1) / reference.norm(dim=-1)
    # The tiny random model amplifies per-layer error ~7x (see the module docstring).
    assert float(relative.mean()) < 0.40 and float(relative.max()) < 0.70, relative
    prompt = DEFAULT_PROMPT.format(labels=", ".join(FER_LABELS))
    label_ids = label_token_ids(processor.tokenizer, prompt, FER_LABELS, FER_LABELS)
    agree = reference[:, label_ids].argmax(-1) == logits[:, label_ids].argmax(-1)
    assert int(agree.sum()) >= 16, agree.tolist()  # measured 18 of 21


def test_engine_runs_fp8_when_model_precision_asks_for_it(
    monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path
) -> None:
    """model.precision = "fp8" through the engine: on a CPU that pretends to be an H100 the
    layers are FP8Linear (emulated); the real CPU refuses it (test_precision.py)."""
    from consumer.config import ModelSettings
    from consumer.engine import EmotionEngine
    from consumer.engine import precision as precision_module

    monkeypatch.setattr(precision_module, "cuda_capability", lambda device: (9, 0))
    settings = ModelSettings(path=tiny_checkpoint, device="cpu", precision="fp8")
    engine = EmotionEngine.load(settings, max_batch_size=2)
    assert (engine.precision, engine.quantized_layers) == ("fp8", 14)
    assert sum(isinstance(m, FP8Linear) for m in engine.model.modules()) == 14
    (result,) = engine.classify([Image.new("RGB", (32, 32), (120, 80, 40))])
    assert abs(sum(result.scores.values()) - 1) < 1e-9
