"""`emotion-worker train`'s parts: split, augmentation, answer-only loss, models, LoRA."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 (torch's convention)
from PIL import Image
from safetensors.torch import load_file

from consumer.config import DEFAULT_PROMPT, FER_LABELS, ModelSettings
from consumer.engine import EmotionEngine
from consumer.engine.loader import validate_checkpoint
from consumer.engine.scoring import label_sequences
from consumer.training.cli import main
from consumer.training.dataset import (
    NO_AUGMENT,
    Augment,
    DatasetError,
    Example,
    Normalizer,
    load_pixels,
    scan_folder,
    stratified_split,
    subsample,
)
from consumer.training.lora import apply_lora, merge_lora
from consumer.training.loss import answer_loss, class_weights, vocab_weights
from consumer.training.model import (
    ARCHS,
    FER_MEAN,
    FER_STD,
    IGNORE_INDEX,
    AnswerFormat,
    build_scratch_model,
    init_vision_tower,
    load_init_model,
    save_checkpoint,
)
from consumer.training.optim import lr_lambda
from consumer.training.probe import VisionProbe
from consumer.training.validation import predict
from tests.conftest import FER_FACES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPT_TEXT = DEFAULT_PROMPT.format(labels=", ".join(FER_LABELS))
CPU = torch.device("cpu")


def _examples(counts: dict[int, int]) -> list[Example]:
    return [
        Example(f"c{label}/{i:04d}.png", label) for label, n in counts.items() for i in range(n)
    ]


def _fer(per_class: int, size: int = 48) -> tuple[list[Example], torch.Tensor, torch.Tensor]:
    """The first `per_class` FER faces of every class: examples, uint8 pixels, labels."""
    examples = scan_folder(FER_FACES, FER_LABELS)
    picked: list[Example] = []
    for label in range(len(FER_LABELS)):
        picked.extend([e for e in examples if e.label == label][:per_class])
    pixels = load_pixels(FER_FACES, picked, size)
    return picked, pixels, torch.tensor([e.label for e in picked])


def _scratch(arch: str = "tiny", seed: int = 0) -> tuple[Any, Any, AnswerFormat]:
    model, processor = build_scratch_model(
        ARCHS[arch], image_size=48, labels=FER_LABELS, prompt=DEFAULT_PROMPT, seed=seed
    )
    fmt = AnswerFormat.build(processor, model.config, PROMPT_TEXT, FER_LABELS, FER_LABELS, 48)
    return model, processor, fmt


NORMALIZE = Normalizer(48, FER_MEAN, FER_STD)


# --- split -------------------------------------------------------------------------------


def test_split_is_stratified_reproducible_and_covers_the_rare_class() -> None:
    examples = _examples({0: 400, 1: 15, 2: 120, 3: 3})
    split = stratified_split(examples, 0.1, seed=7)
    val = Counter(e.label for e in split.val)
    assert val == {0: 40, 1: 2, 2: 12, 3: 1}  # round(n * 0.1), at least one per class
    assert set(split.train).isdisjoint(split.val)
    assert sorted(split.train + split.val, key=lambda e: e.path) == sorted(
        examples, key=lambda e: e.path
    )
    # The same seed gives the same split whatever the listing order; another seed differs.
    again = stratified_split(list(reversed(examples)), 0.1, seed=7)
    assert again.to_json() == split.to_json()
    assert stratified_split(examples, 0.1, seed=8).to_json() != split.to_json()


def test_split_rejects_bad_fractions_and_subsample_keeps_proportions() -> None:
    examples = _examples({0: 300, 1: 30, 2: 600})
    with pytest.raises(DatasetError):
        stratified_split(examples, 1.0, seed=0)
    assert stratified_split(examples, 0.0, seed=0).val == []
    small = subsample(examples, 93, seed=0)
    assert Counter(e.label for e in small) == {0: 30, 1: 3, 2: 60}
    assert subsample(examples, 93, seed=0) == small


def test_scan_folder_lists_labels_and_refuses_unknown_classes(tmp_path: Path) -> None:
    for name in ("happy", "sad"):
        (tmp_path / name).mkdir()
        Image.new("L", (48, 48), 10).save(tmp_path / name / "a.png")
    (tmp_path / "happy" / "notes.txt").write_text("not an image")
    examples = scan_folder(tmp_path, FER_LABELS)
    assert examples == [Example("happy/a.png", 3), Example("sad/a.png", 5)]
    (tmp_path / "bored").mkdir()
    with pytest.raises(DatasetError, match="bored"):
        scan_folder(tmp_path, FER_LABELS)
    with pytest.raises(DatasetError, match="does not exist"):
        scan_folder(tmp_path / "missing", FER_LABELS)


# --- pixels and augmentation -------------------------------------------------------------


def test_fer_faces_load_as_one_gray_channel_and_normalise_like_the_processor(
    fer_faces: list[tuple[Path, str]],
) -> None:
    _, processor, _ = _scratch()
    path, label = fer_faces[0]
    pixels = load_pixels(FER_FACES, [Example(f"{label}/{path.name}", 0)], 48)
    assert pixels.shape == (1, 1, 48, 48) and pixels.dtype == torch.uint8
    with Image.open(path) as image:
        reference = processor.image_processor(images=[image.convert("RGB")], return_tensors="pt")
    assert torch.allclose(NORMALIZE(pixels), reference["pixel_values"], atol=1e-5)


def test_augmentation_keeps_size_and_dtype_and_is_deterministic_per_seed() -> None:
    _, pixels, _ = _fer(2)
    augment = Augment(erase=0.5)

    def run(seed: int) -> torch.Tensor:
        return augment(pixels, torch.Generator().manual_seed(seed))

    first = run(0)
    assert first.shape == pixels.shape and first.dtype == torch.uint8
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))
    assert not torch.equal(first, pixels)
    # Faces stay faces: mostly the same picture, not noise.
    assert (first.float() - pixels.float()).abs().mean() < 60
    assert torch.equal(NO_AUGMENT(pixels, torch.Generator().manual_seed(0)), pixels)


def test_flip_only_mirrors_horizontally() -> None:
    _, pixels, _ = _fer(1)
    flip = Augment(scale=(1, 1), ratio=(1, 1), degrees=0, flip=1.0, brightness=0, contrast=0)
    assert torch.equal(flip(pixels, torch.Generator().manual_seed(0)), pixels.flip(-1))


# --- answer-only loss --------------------------------------------------------------------


def test_labels_are_ignored_everywhere_but_the_answer_and_eos() -> None:
    _, processor, fmt = _scratch()
    tokenizer = processor.tokenizer
    targets = torch.tensor([3, 1, 6])
    input_ids, attention, labels = fmt.batch(targets)
    start = len(fmt.prompt_ids)
    assert input_ids.shape == labels.shape == (3, start + 2)  # one word + EOS, no padding
    assert bool(attention.all())
    sequences = label_sequences(tokenizer, PROMPT_TEXT, FER_LABELS, FER_LABELS)
    for row, target in enumerate(targets.tolist()):
        assert input_ids[row, :start].tolist() == list(fmt.prompt_ids)
        assert (labels[row, :start] == IGNORE_INDEX).all()
        assert labels[row, start:].tolist() == [*sequences[target], tokenizer.eos_token_id]
        assert tokenizer.convert_ids_to_tokens(int(labels[row, start])) == FER_LABELS[target]
    # The prompt is exactly what the engine scores after: the processor's expansion of it.
    image_tokens = sum(1 for t in fmt.prompt_ids if t == fmt.image_token_id)
    assert image_tokens == (48 // ARCHS["tiny"].patch_size) ** 2


def test_padding_for_answers_of_different_lengths_is_ignored() -> None:
    fmt = AnswerFormat(
        prompt_ids=(1, 9, 9, 5),
        answers=((20, 2), (21, 22, 2)),
        answer_lengths=(1, 2),
        pad_id=3,
        image_token_id=9,
    )
    input_ids, attention, labels = fmt.batch(torch.tensor([0, 1]))
    assert input_ids.tolist() == [[1, 9, 9, 5, 20, 2, 3], [1, 9, 9, 5, 21, 22, 2]]
    assert attention.tolist() == [[1, 1, 1, 1, 1, 1, 0], [1] * 7]
    ignore = IGNORE_INDEX
    assert labels.tolist() == [
        [ignore] * 4 + [20, 2, ignore],
        [ignore] * 4 + [21, 22, 2],
    ]
    assert not fmt.first_tokens_unique or fmt.first_tokens == (20, 21)


def test_loss_is_cross_entropy_of_the_answer_positions_only() -> None:
    model, _, fmt = _scratch()
    _, pixels, targets = _fer(1)
    values = NORMALIZE(pixels)
    loss, scores = answer_loss(model, fmt, values, targets)
    input_ids, _, labels = fmt.batch(targets)
    logits = model(input_ids=input_ids, pixel_values=values).logits
    start = len(fmt.prompt_ids)
    # Position i predicts token i+1: the answer from the last prompt position, EOS after it.
    expected = F.cross_entropy(
        logits[:, start - 1 : start + 1].reshape(-1, logits.shape[-1]),
        labels[:, start : start + 2].reshape(-1),
    )
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(scores, logits[:, start - 1, list(fmt.first_tokens)], atol=1e-5)
    # Label smoothing and weights change the loss, not which positions count.
    smoothed, _ = answer_loss(model, fmt, values, targets, label_smoothing=0.1)
    assert float(smoothed.detach()) != pytest.approx(float(loss.detach()))


def test_class_weights_favour_rare_classes_and_average_one() -> None:
    _, _, fmt = _scratch()
    counts = [3995, 436, 4097, 7215, 4965, 4830, 3171]
    weights = vocab_weights(counts, fmt, 40, power=0.5)
    per_label = [float(weights[t]) for t in fmt.first_tokens]
    assert per_label[1] == max(per_label) and per_label[3] == min(per_label)
    assert per_label[1] / per_label[3] == pytest.approx((7215 / 436) ** 0.5, rel=1e-4)
    mean = sum(w * c for w, c in zip(per_label, counts, strict=True)) / sum(counts)
    assert mean == pytest.approx(1.0, rel=1e-5)
    assert float(weights[0]) == 1.0  # not a label token
    assert torch.equal(vocab_weights(counts, fmt, 40, power=0.0), torch.ones(40))


def test_class_weights_without_balancing_or_images() -> None:
    assert class_weights([10, 0, 30], power=0.0).tolist() == [1.0, 0.0, 1.0]
    weights = class_weights([10, 0, 40], power=1.0)
    assert weights[1] == 0 and weights[0] / weights[2] == pytest.approx(4.0)


def test_smart_init_whitens_patches_and_sets_positions_deterministically() -> None:
    _, pixels, _ = _fer(20)
    values = NORMALIZE(pixels)

    def initialised(seed: int) -> Any:
        model, _, _ = _scratch("small", seed=0)
        init_vision_tower(model, values, seed)
        return model.model.vision_tower

    tower = initialised(0)
    patch = tower.config.patch_size
    with torch.no_grad():
        embedded = tower.embeddings.patch_embedding(values).flatten(2).transpose(1, 2)
    flat = embedded.reshape(-1, embedded.shape[-1])
    variance = flat.var(dim=0)
    # The leading PCA components come out with unit variance (whitened), not 0.02-scaled.
    # FER images are grey, so the three channels are equal: only patch*patch components exist.
    leading = min(tower.config.hidden_size, patch * patch) // 2
    assert variance[:leading].mean() == pytest.approx(1.0, abs=0.2)
    positions = tower.embeddings.position_embedding.weight
    assert torch.equal(positions[0], torch.zeros_like(positions[0]))  # CLS
    assert positions[1:].abs().max() <= 0.5 + 1e-6  # 0.5 * sin/cos
    attention = tower.encoder.layers[0].self_attn
    product = attention.q_proj.weight.T @ attention.k_proj.weight  # ~ 0.7 (Z + I), summed
    assert product.diagonal().mean() > 3 * product.fill_diagonal_(0).abs().mean()
    again = initialised(0)
    assert torch.equal(again.encoder.layers[0].self_attn.q_proj.weight, attention.q_proj.weight)
    other = initialised(1)
    assert not torch.equal(other.encoder.layers[0].self_attn.q_proj.weight, attention.q_proj.weight)


def test_vision_probe_reads_pooled_features_and_detaches() -> None:
    model, _, fmt = _scratch("tiny")
    _, pixels, targets = _fer(1)
    probe = VisionProbe(model, len(FER_LABELS))
    with pytest.raises(RuntimeError):
        probe.logits()
    answer_loss(model, fmt, NORMALIZE(pixels), targets)
    logits = probe.logits()
    assert logits.shape == (len(FER_LABELS), len(FER_LABELS)) and logits.requires_grad
    probe.close()
    answer_loss(model, fmt, NORMALIZE(pixels), targets)
    with pytest.raises(RuntimeError):
        probe.logits()  # no longer attached


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    factor = lr_lambda(total_steps=100, warmup_steps=10, min_ratio=0.02)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    values = [factor(step) for step in range(10, 101)]
    assert values == sorted(values, reverse=True)
    assert factor(100) == pytest.approx(0.02)


# --- from-scratch models -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["tiny", "small"])
def test_scratch_checkpoint_loads_in_the_engine_and_scores_what_was_trained(
    arch: str, tmp_path: Path
) -> None:
    model, processor, fmt = _scratch(arch)
    save_checkpoint(model, processor, tmp_path)
    validate_checkpoint(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 48
    assert config["vision_feature_layer"] == -1
    engine = EmotionEngine.load(ModelSettings(path=tmp_path, device="cpu"))
    assert engine.label_token_ids == fmt.first_tokens
    assert engine.image_tokens == (48 // ARCHS[arch].patch_size) ** 2
    examples, pixels, targets = _fer(1)
    faces = []
    for example in examples:
        with Image.open(FER_FACES / example.path) as image:
            faces.append(image.copy())
    results = engine.classify(faces)
    model.eval()
    with torch.no_grad():
        _, scores = answer_loss(model, fmt, NORMALIZE(pixels), targets)
    expected = scores.double().softmax(dim=1)
    got = torch.tensor(
        [[r.scores[label] for label in FER_LABELS] for r in results], dtype=torch.float64
    )
    assert torch.allclose(got, expected, atol=1e-4)
    assert predict(model, fmt, pixels, NORMALIZE, batch_size=4, device=CPU).tolist() == [
        FER_LABELS.index(r.label) for r in results
    ]


def test_overfitting_sixteen_faces_drives_their_accuracy_up() -> None:
    torch.manual_seed(0)
    model, _, fmt = _scratch("tiny", seed=1)
    _, pixels, targets = _fer(3)
    pixels, targets = pixels[:16], targets[:16]
    before = predict(model, fmt, pixels, NORMALIZE, batch_size=16, device=CPU) == targets
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    values = NORMALIZE(pixels)
    for _ in range(80):
        loss, _ = answer_loss(model, fmt, values, targets)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad()
    after = predict(model, fmt, pixels, NORMALIZE, batch_size=16, device=CPU) == targets
    assert float(before.float().mean()) <= 0.4
    assert float(after.float().mean()) >= 0.9


# --- LoRA --------------------------------------------------------------------------------


def test_lora_on_the_tiny_checkpoint_learns_and_merges_into_a_loadable_checkpoint(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model, processor, device = load_init_model(tiny_checkpoint, "cpu")
    size = int(processor.image_processor.crop_size["height"])
    fmt = AnswerFormat.build(processor, model.config, PROMPT_TEXT, FER_LABELS, FER_LABELS, size)
    peft_model = apply_lora(model, rank=8, alpha=16, dropout=0.0)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "multi_modal_projector" in n for n in trained)
    assert any("language_model" in n and "lora_A" in n for n in trained)
    assert not any("vision_tower" in n for n in trained)
    vision_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if "vision_tower" in n
    }

    _, pixels, targets = _fer(2, size)  # stored at the checkpoint's own input size
    normalize = Normalizer(
        size,
        tuple(processor.image_processor.image_mean),
        tuple(processor.image_processor.image_std),
    )
    values = normalize(pixels).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(15):
        loss, _ = answer_loss(model, fmt, values, targets)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    for name, parameter in model.named_parameters():
        if name in vision_before:
            assert torch.equal(parameter, vision_before[name])

    model.eval()
    with torch.no_grad():
        _, adapted = answer_loss(model, fmt, values, targets)
    merged = merge_lora(peft_model, torch.float32)
    out = tmp_path / "merged"
    save_checkpoint(merged, processor, out)
    assert not [key for key in load_file(out / "model.safetensors") if "lora" in key]
    engine = EmotionEngine.load(ModelSettings(path=out, device="cpu"))
    faces = [Image.fromarray(face[0].numpy()) for face in pixels]
    results = engine.classify(faces)
    got = torch.tensor(
        [[r.scores[label] for label in FER_LABELS] for r in results], dtype=torch.float64
    )
    # The merged weights answer as the adapters did.
    assert torch.allclose(got, adapted.double().softmax(dim=1), atol=1e-4)


# --- command line ------------------------------------------------------------------------


def test_command_line_refuses_bad_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--help"]) == 0
    assert "--from-scratch" in capsys.readouterr().out
    common = ["--out", str(tmp_path / "out")]
    assert main([*common, "--data", str(tmp_path), "--lora"]) == 2  # LoRA needs --init
    assert main([*common, "--data", str(tmp_path), "--labels", "happy"]) == 2
    assert main([*common, "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--", "--out", "x"]) == 2  # the separator `emotion-worker train --` keeps


def test_missing_training_data_is_one_line_naming_data_and_its_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from consumer.eval.dataset import missing_data_message

    missing = tmp_path / "fer2013" / "train"
    out = tmp_path / "out"
    assert main(["--data", str(missing), "--out", str(out), "--labels", "happy,sad"]) == 2
    err = capsys.readouterr().err
    assert err == f"emotion-worker train: {missing_data_message(missing, ('happy', 'sad'))}\n"
    assert f"--data {missing} does not exist" in err
    assert "one folder of images per class (happy/, sad/)" in err
    assert '"emotion-detection-fer"' in err and "ICML 2013" in err
    assert "404 faces committed in data/faces are enough" in err
    assert not out.exists()  # nothing written, nothing trained
    # A file is not a data folder either.
    (tmp_path / "file.png").write_bytes(b"")
    assert main(["--data", str(tmp_path / "file.png"), "--out", str(out)]) == 2
    assert "does not exist (or is not a folder)" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
@pytest.mark.parametrize("target", ["model", "model-eval"])
def test_make_model_targets_stop_without_training_data(tmp_path: Path, target: str) -> None:
    """`make model` / `make model-eval` take FER=... or FER2013_TRAIN and, without an
    existing folder, stop before doing anything with the trainer's message."""
    from consumer.eval.dataset import missing_data_message

    env = {k: v for k, v in os.environ.items() if k not in ("FER", "FER2013_TRAIN", "MAKEFLAGS")}
    missing = tmp_path / "fer2013" / "train"
    repo = Path(__file__).resolve().parents[2]
    for extra_env, args, expected in (
        ({}, [f"FER={missing}"], missing_data_message(missing)),
        ({"FER2013_TRAIN": str(missing)}, [], missing_data_message(missing)),
        ({}, [], "--data is not set (give FER=<folder> or FER2013_TRAIN=<folder>): it must"),
    ):
        done = subprocess.run(
            ["make", "--no-print-directory", "-C", str(repo), target, *args],
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode != 0
        assert expected in done.stderr, done.stderr
        assert done.stdout == ""  # no recipe ran (not even setup)
    assert missing_data_message(missing).endswith(
        "for a smoke run the 404 faces committed in data/faces are enough (--data data/faces)"
    )
