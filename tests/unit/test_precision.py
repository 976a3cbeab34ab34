"""model.precision resolved: the decision table with fake probes, the real probes on the CPU,
and the engine reporting what it chose."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from structlog.testing import capture_logs
from torch import nn

from consumer.config import ModelSettings
from consumer.engine import EmotionEngine, ModelLoadError
from consumer.engine import precision as precision_module
from consumer.engine.fp8 import FP8Linear
from consumer.engine.int8 import Int8Linear
from consumer.engine.linears import LayerInputs
from consumer.engine.precision import (
    MIN_COSINE,
    MIN_SPEEDUP,
    PrecisionError,
    choose_precision,
    linear_speedup,
    min_cosine,
    resolve_precision,
    spread,
)
from consumer.preflight.local_checks import model_setting

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)


class Probes:
    """Fake start-up checks that record which precision each was asked about."""

    def __init__(self, cosine: float = 0.9999, speedup: float = 1.5) -> None:
        self.cosine, self.speedup = cosine, speedup
        self.checked: list[str] = []
        self.benchmarked: list[str] = []

    def self_check(self, precision: str) -> float:
        self.checked.append(precision)
        return self.cosine

    def micro_benchmark(self, precision: str) -> float:
        self.benchmarked.append(precision)
        return self.speedup


def _resolve(
    requested: str, device: torch.device, cap: tuple[int, int] | None, probes: Probes
) -> Any:
    return resolve_precision(
        requested,
        device,
        capability=lambda _: cap,
        self_check=probes.self_check,
        micro_benchmark=probes.micro_benchmark,
    )


# requested, device, capability, cosine, speedup -> precision, (checked, benchmarked)
TABLE = [
    ("bf16", CUDA, (9, 0), 1.0, 9.0, "none", ([], [])),
    ("none", CPU, None, 1.0, 9.0, "none", ([], [])),
    ("fp8", CUDA, (9, 0), 0.5, 0.5, "fp8", ([], [])),  # explicit: no checks
    ("fp8", CUDA, (8, 9), 0.5, 0.5, "fp8", ([], [])),
    ("int8", CUDA, (8, 0), 0.5, 0.5, "int8", ([], [])),
    ("int8", CPU, None, 0.5, 0.5, "int8", ([], [])),  # the CPU kernel, for tests
    ("auto", CPU, None, 1.0, 9.0, "none", ([], [])),  # CPU: as before 0.3.0
    ("auto", CUDA, (9, 0), 0.5, 1.5, "fp8", ([], ["fp8"])),  # fp8: no fidelity check
    ("auto", CUDA, (8, 9), 0.5, 1.0, "none", ([], ["fp8"])),  # not faster
    ("auto", CUDA, (8, 0), 0.9995, 1.5, "int8", (["int8"], ["int8"])),  # A100
    ("auto", CUDA, (8, 6), 0.9995, 1.5, "int8", (["int8"], ["int8"])),  # A10, RTX 30xx
    ("auto", CUDA, (8, 0), 0.998, 9.0, "none", (["int8"], [])),  # fails fidelity
    ("auto", CUDA, (8, 0), 0.9995, 1.04, "none", (["int8"], ["int8"])),  # under 1.05x
    ("auto", CUDA, (7, 5), 1.0, 9.0, "none", ([], [])),  # T4: neither
]


@pytest.mark.parametrize(
    ("requested", "device", "cap", "cosine", "speedup", "expected", "calls"), TABLE
)
def test_decision_table(
    requested: str,
    device: torch.device,
    cap: tuple[int, int] | None,
    cosine: float,
    speedup: float,
    expected: str,
    calls: tuple[list[str], list[str]],
) -> None:
    probes = Probes(cosine, speedup)
    choice = _resolve(requested, device, cap, probes)
    assert choice.precision == expected
    assert (probes.checked, probes.benchmarked) == calls
    assert choice.reason  # always says why
    if probes.benchmarked:
        assert choice.speedup == speedup and f"{speedup:.2f}x" in choice.reason
    if probes.checked:
        assert choice.min_cosine == cosine


def test_thresholds() -> None:
    assert MIN_COSINE == 0.999 and MIN_SPEEDUP == 1.05


@pytest.mark.parametrize(("device", "cap"), [(CPU, None), (CUDA, (8, 0)), (CUDA, (8, 6))])
def test_explicit_fp8_without_fp8_hardware_names_the_setting_and_the_fix(
    device: torch.device, cap: tuple[int, int] | None
) -> None:
    with pytest.raises(PrecisionError) as info:
        _resolve("fp8", device, cap, Probes())
    message = str(info.value)
    assert 'model.precision = "fp8" needs a CUDA GPU of compute capability 8.9' in message
    assert 'Set model.precision = "auto"' in message and '"bf16"' in message
    assert isinstance(info.value, ModelLoadError)  # the engine's load error: exit 2
    assert model_setting(message) == "model.precision"  # emotion-worker check names it


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(PrecisionError, match=r"model\.precision = 'fp4' is unknown"):
        _resolve("fp4", CPU, None, Probes())


def test_spread_keeps_the_ends_and_the_order() -> None:
    names = [f"l{i}" for i in range(224)]
    picked = spread(names, 16)
    assert len(picked) == 16 and picked[0] == "l0" and picked[-1] == "l223"
    assert picked == sorted(picked, key=names.index)
    # 7 projections per decoder layer: the picks are not all the same projection.
    assert len({names.index(name) % 7 for name in picked}) >= 5
    assert spread(names[:5], 16) == names[:5]


# --- the real probes, on the CPU ------------------------------------------------------------


def _linears() -> dict[str, nn.Linear]:
    generator = torch.Generator().manual_seed(0)
    layers = {}
    for name, (fan_in, fan_out) in {"a": (64, 128), "b": (128, 64), "c": (64, 128)}.items():
        linear = nn.Linear(fan_in, fan_out).requires_grad_(False)
        linear.weight.copy_(torch.randn(fan_out, fan_in, generator=generator) * 0.05)
        layers[name] = linear
    return layers


def test_min_cosine_measures_each_sampled_layer() -> None:
    linears = _linears()
    generator = torch.Generator().manual_seed(1)
    samples = {
        name: torch.randn(32, layer.in_features, generator=generator)
        for name, layer in linears.items()
    }
    inputs = LayerInputs(absmax={}, samples=samples)
    int8 = min_cosine(linears, inputs, "int8")
    fp8 = min_cosine(linears, inputs, "fp8")
    assert 0.9995 < int8 < 1.0  # ~1% error: cosine ~0.99995
    assert 0.998 < fp8 < int8  # ~3.7% error: cosine ~0.9993
    assert min_cosine(linears, LayerInputs({}, {}), "int8") == 1.0  # nothing sampled


def test_linear_speedup_times_each_shape_once() -> None:
    speedup = linear_speedup(_linears(), "int8", rows=64, repeats=2)
    assert 0.0 < speedup < 1000.0
    assert linear_speedup({}, "int8", rows=64) == 1.0


def test_choose_precision_records_once_smooths_int8_and_logs(
    monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path
) -> None:
    engine = EmotionEngine.load(ModelSettings(path=tiny_checkpoint, device="cpu", precision="bf16"))
    assert (engine.precision, engine.quantized_layers) == ("none", 0)
    runs: list[int] = []
    pixels = engine._pixel_values([Image.new("RGB", (32, 32), (90, 120, 150))])

    def calibrate() -> None:
        runs.append(1)
        engine._scorer(pixels)

    monkeypatch.setattr(precision_module, "linear_speedup", lambda *a, **k: 2.0)
    with capture_logs() as logs:
        choice, layers = choose_precision(
            engine.model, "auto", CPU, calibrate=calibrate, rows=64, capability=lambda _: (8, 0)
        )
    assert choice.precision == "int8" and layers == 14 and runs == [1]
    assert choice.min_cosine is not None and choice.min_cosine >= MIN_COSINE
    quantized = [m for m in engine.model.modules() if isinstance(m, Int8Linear)]
    assert len(quantized) == 14 and all(m.smooth is not None for m in quantized)  # SmoothQuant
    (event,) = [e for e in logs if e["event"] == "int8 on the CPU is for tests and accuracy checks"]
    assert event["precision"] == "int8" and event["quantized_layers"] == 14
    assert event["speedup"] == 2.0 and "2.00x faster" in event["reason"]
    assert engine.classify([Image.new("RGB", (32, 32))])[0].label in engine.labels


def test_choose_precision_keeps_the_base_when_int8_fails_its_check(
    monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path
) -> None:
    engine = EmotionEngine.load(ModelSettings(path=tiny_checkpoint, device="cpu", precision="none"))
    runs: list[int] = []
    monkeypatch.setattr(precision_module, "min_cosine", lambda *a: 0.99)
    benchmarked = []
    monkeypatch.setattr(precision_module, "linear_speedup", lambda *a, **k: benchmarked.append(1))
    with capture_logs() as logs:
        choice, layers = choose_precision(
            engine.model,
            "auto",
            CUDA,  # never touched: the probes are fakes or unused
            calibrate=lambda: runs.append(1),
            rows=64,
            capability=lambda _: (8, 0),
        )
    assert (choice.precision, layers, runs, benchmarked) == ("none", 0, [1], [])
    assert "fidelity" in choice.reason and "0.99000" in choice.reason
    assert [e["event"] for e in logs] == ["precision chosen"]
    assert not any(isinstance(m, Int8Linear | FP8Linear) for m in engine.model.modules())


# --- the engine -----------------------------------------------------------------------------


def test_engine_reports_its_precision(tiny_checkpoint: Path) -> None:
    auto = EmotionEngine.load(ModelSettings(path=tiny_checkpoint, device="cpu"))
    assert (auto.precision, auto.quantized_layers) == ("none", 0)  # the default: as before
    assert "auto on cpu" in auto.precision_reason
    int8 = EmotionEngine.load(ModelSettings(path=tiny_checkpoint, device="cpu", precision="int8"))
    assert (int8.precision, int8.quantized_layers) == ("int8", 14)
    faces = [Image.new("RGB", (32, 32), (40 * i, 60, 200 - 30 * i)) for i in range(4)]
    for a, b in zip(auto.classify(faces), int8.classify(faces), strict=True):
        assert sum(abs(a.scores[k] - b.scores[k]) for k in a.scores) < 0.1
    with pytest.raises(ModelLoadError, match=r'model\.precision = "fp8" needs'):
        EmotionEngine.load(ModelSettings(path=tiny_checkpoint, device="cpu", precision="fp8"))
