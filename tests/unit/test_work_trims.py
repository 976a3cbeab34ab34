"""Exact work trims: the last decoder layer for the last position only, `model.dtype = "auto"`
by model size, and weights loaded straight onto the model's device.

The trim must not change a score beyond float rounding, whatever runs the language model's
linear layers (float32, int8, fp8) and under torch.compile (one graph, no breaks).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from consumer.config import ModelSettings
from consumer.engine import EmotionEngine, ModelLoadError
from consumer.engine.fastpath import LabelHead, LabelScorer
from consumer.engine.fp8 import quantize_language_model
from consumer.engine.lastlayer import last_position_hidden, supports_last_layer_trim
from consumer.engine.loader import (
    SMALL_MODEL_PARAMETERS,
    checkpoint_parameters,
    choose_dtype,
    load_checkpoint,
)
from tests.conftest import FER_CHECKPOINT, FER_FACES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU = torch.device("cpu")
CUDA = torch.device("cuda")
# float32 on the CPU: the trimmed and the whole forward differ only by summation order.
EXACT = 1e-5


def _faces(count: int) -> list[Image.Image]:
    images = []
    for path in sorted(FER_FACES.rglob("*.png"))[:count]:
        with Image.open(path) as image:
            images.append(image.copy())
    return images


def _untrimmed(engine: EmotionEngine) -> LabelScorer:
    """A second scorer over the engine's (cut, possibly quantized) model, without the trim."""
    return LabelScorer(
        engine.model, engine._prompt.input_ids, engine.label_sequences, trim_last_layer=False
    )


def _max_probability_gap(engine: EmotionEngine, faces: list[Image.Image]) -> float:
    pixels = engine._pixel_values(faces)
    with torch.inference_mode():
        trimmed = engine._scorer(pixels).double().softmax(dim=-1)
        whole = _untrimmed(engine)(pixels).double().softmax(dim=-1)
    assert trimmed.argmax(dim=1).tolist() == whole.argmax(dim=1).tolist()
    return float((trimmed - whole).abs().max())


def _llama(attention: str, kv_heads: int) -> Any:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        attn_implementation=attention,
        # Scaled rope: the trim must take cos/sin from the model's own rotary module.
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    )
    return LlamaModel(config).eval()


@pytest.mark.parametrize(("attention", "kv_heads"), [("sdpa", 4), ("sdpa", 2), ("eager", 2)])
def test_trim_equals_the_whole_forward_and_compiles_to_one_graph(
    attention: str, kv_heads: int
) -> None:
    model = _llama(attention, kv_heads)
    assert supports_last_layer_trim(model)
    embeds = torch.randn(3, 40, 64)
    with torch.no_grad():
        whole = model(inputs_embeds=embeds).last_hidden_state[:, -1]
        trimmed = last_position_hidden(model, embeds)
        # fullgraph: any graph break the trim introduced would raise here.
        compiled = torch.compile(
            lambda x: last_position_hidden(model, x), backend="eager", fullgraph=True
        )(embeds)
    torch._dynamo.reset()
    assert trimmed.shape == (3, 64)
    assert float((trimmed - whole).abs().max()) < EXACT
    assert torch.equal(compiled, trimmed)


def test_other_decoders_keep_the_plain_forward(tiny_checkpoint: Path) -> None:
    from transformers.models.llama.modeling_llama import LlamaModel

    class Custom(LlamaModel):  # a subclass may change what a layer does
        pass

    model = _llama("sdpa", 4)
    model.__class__ = Custom
    assert not supports_last_layer_trim(model)
    assert not supports_last_layer_trim(torch.nn.Linear(2, 2))
    engine = EmotionEngine.load(ModelSettings(path=tiny_checkpoint, device="cpu"))
    assert engine._scorer.head.trim_last_layer
    # A head asked not to trim (comparisons) runs the whole forward.
    head = LabelHead(engine.model, engine.label_sequences, trim_last_layer=False)
    assert not head.trim_last_layer


@pytest.mark.parametrize("which", ["tiny", "shipped"])
def test_trim_is_exact_on_the_checkpoints(which: str, tiny_checkpoint: Path) -> None:
    path = tiny_checkpoint if which == "tiny" else FER_CHECKPOINT
    engine = EmotionEngine.load(ModelSettings(path=path, device="cpu"), max_batch_size=32)
    assert engine._scorer.head.trim_last_layer and engine.dtype == torch.float32
    assert _max_probability_gap(engine, _faces(32)) < EXACT


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_trim_runs_the_quantized_layers(precision: str, tiny_checkpoint: Path) -> None:
    """The trimmed last layer calls the layer's own (swapped) modules: both paths run the
    same int8/fp8 layers, quantizing each token on its own, so they still agree exactly."""
    settings = ModelSettings(
        path=tiny_checkpoint, device="cpu", precision="int8" if precision == "int8" else "none"
    )
    engine = EmotionEngine.load(settings, max_batch_size=8)
    if precision == "fp8":  # emulated on the CPU; model.precision = "fp8" needs a GPU
        assert quantize_language_model(engine.model) > 0
    else:
        assert engine.quantized_layers > 0
    last = engine.model.model.language_model.layers[-1]
    assert type(last.self_attn.q_proj).__name__ != "Linear"
    assert type(last.mlp.down_proj).__name__ != "Linear"
    assert _max_probability_gap(engine, _faces(8)) < EXACT


def test_auto_dtype_follows_device_and_model_size() -> None:
    small, large = 116_032, 7_063_000_000
    assert choose_dtype("auto", CPU, small)[0] == torch.float32
    assert choose_dtype("auto", CPU, large)[0] == torch.float32
    dtype, reason = choose_dtype("auto", CUDA, small)
    assert dtype == torch.float32 and "0.1M parameters < 100M" in reason
    dtype, reason = choose_dtype("auto", CUDA, large)
    assert dtype == torch.bfloat16 and "7063.0M parameters >= 100M" in reason
    assert choose_dtype("auto", CUDA, SMALL_MODEL_PARAMETERS - 1)[0] == torch.float32
    assert choose_dtype("auto", CUDA, SMALL_MODEL_PARAMETERS)[0] == torch.bfloat16
    assert choose_dtype("auto", CUDA, None)[0] == torch.bfloat16  # size unknown
    # An explicit dtype is taken as it is, anywhere.
    assert choose_dtype("float32", CUDA, large) == (torch.float32, 'model.dtype = "float32"')
    assert choose_dtype("bfloat16", CPU, small)[0] == torch.bfloat16


def test_checkpoint_parameters_come_from_the_headers() -> None:
    loaded = load_checkpoint(ModelSettings(path=FER_CHECKPOINT, device="cpu"))
    expected = sum(int(p.numel()) for p in loaded.model.parameters())
    assert checkpoint_parameters(FER_CHECKPOINT) == expected < SMALL_MODEL_PARAMETERS


def test_a_corrupt_weights_file_is_a_load_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert checkpoint_parameters(broken) is None  # size unknown: from_pretrained says why
    with pytest.raises(ModelLoadError, match="could not be loaded"):
        load_checkpoint(ModelSettings(path=broken, device="cpu"))


def _recording_loads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record from_pretrained's keyword arguments while still loading the model."""
    import transformers

    model_class: Any = transformers.LlavaForConditionalGeneration
    original = model_class.from_pretrained.__func__
    calls: list[dict[str, Any]] = []

    def recording(cls: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(model_class, "from_pretrained", classmethod(recording))
    return calls


def test_weights_load_straight_onto_the_device(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _recording_loads(monkeypatch)
    loaded = load_checkpoint(ModelSettings(path=tiny_checkpoint, device="cpu"))
    assert calls[-1]["device_map"] == {"": CPU}
    tensors = [*loaded.model.parameters(), *loaded.model.buffers()]
    assert {t.device for t in tensors} == {CPU}
    # Rotary frequencies stay float32 whatever the weights' dtype, as without device_map.
    rotary = loaded.model.model.language_model.rotary_emb.inv_freq
    assert rotary.dtype == torch.float32


def test_without_accelerate_weights_load_on_the_host_then_move(
    tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers.utils.import_utils

    calls = _recording_loads(monkeypatch)
    monkeypatch.setattr(transformers.utils.import_utils, "is_accelerate_available", lambda: False)
    via_host = load_checkpoint(ModelSettings(path=tiny_checkpoint, device="cpu"))
    assert "device_map" not in calls[-1]
    monkeypatch.undo()
    direct = load_checkpoint(ModelSettings(path=tiny_checkpoint, device="cpu"))
    # On the CPU both ways give the same model, bit for bit.
    first, second = via_host.model.state_dict(), direct.model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
