"""Distillation (teacher, KL term), temperature calibration and the engine's flip TTA."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps

from consumer.config import DEFAULT_PROMPT, FER_LABELS, ModelSettings
from consumer.engine import EmotionEngine
from consumer.training.calibration import fit_temperature, fold_temperature
from consumer.training.cli import main
from consumer.training.dataset import NO_AUGMENT, scan_folder, stratified_split
from consumer.training.loss import answer_loss, distillation_loss
from consumer.training.model import save_checkpoint
from consumer.training.teacher import (
    TEACHER_FILE,
    TeacherConfig,
    TeacherNet,
    load_teacher,
    teacher_key,
    teacher_logits,
    train_teacher,
)
from tests.conftest import FER_FACES
from tests.unit.test_train import NORMALIZE, _fer, _scratch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU = torch.device("cpu")


# --- the KL term ---------------------------------------------------------------------------


def test_distillation_loss_is_zero_for_the_teachers_own_logits_and_pulls_towards_them() -> None:
    teacher = torch.tensor([[3.0, 1.0, -2.0], [0.0, 2.0, 0.5]])
    assert float(distillation_loss(teacher.clone(), teacher, 2.0)) == pytest.approx(0, abs=1e-6)
    # A shift of all logits is the same distribution.
    assert float(distillation_loss(teacher + 5, teacher, 2.0)) == pytest.approx(0, abs=1e-6)
    student = torch.zeros(2, 3, requires_grad=True)
    loss = distillation_loss(student, teacher, 2.0)
    assert float(loss.detach()) > 0.1
    loss.backward()  # type: ignore[no-untyped-call]
    assert student.grad is not None
    # Gradient descent raises the logits the teacher prefers: the teacher's top label gets
    # the most negative gradient in each row.
    assert student.grad.argmin(dim=1).tolist() == teacher.argmax(dim=1).tolist()
    # The T^2 factor: at a high temperature the loss stays of the order of the logits' gap.
    assert float(distillation_loss(torch.zeros(2, 3), teacher, 8.0)) > 0.05
    with pytest.raises(ValueError, match="one output per label"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4), 2.0)


def test_answer_loss_returns_label_logits_with_their_gradient() -> None:
    model, _, fmt = _scratch("tiny")
    _, pixels, targets = _fer(1)
    _, logits = answer_loss(model, fmt, NORMALIZE(pixels), targets)
    assert logits.shape == (len(FER_LABELS), len(FER_LABELS)) and logits.requires_grad
    distillation_loss(logits, torch.randn_like(logits), 2.0).backward()  # type: ignore[no-untyped-call]
    assert model.lm_head.weight.grad is not None
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad is not None


# --- temperature ---------------------------------------------------------------------------


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_temperature_that_generated_the_labels(
    true_temperature: float,
) -> None:
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(20_000, 7, generator=generator) * 3
    probabilities = (logits / true_temperature).softmax(dim=1)
    targets = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
    fitted = fit_temperature(logits, targets)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    with pytest.raises(ValueError, match="need"):
        fit_temperature(logits[:0], targets[:0])


def test_folded_temperature_divides_the_engines_logits_and_keeps_every_answer(
    tmp_path: Path,
) -> None:
    model, processor, _ = _scratch("tiny")
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # confident answers, so a temperature matters
    save_checkpoint(model, processor, tmp_path / "raw")
    fold_temperature(model, 4.0)
    save_checkpoint(model, processor, tmp_path / "cooled")
    faces = [Image.open(FER_FACES / e.path).copy() for e in scan_folder(FER_FACES, FER_LABELS)[:20]]
    raw = EmotionEngine.load(ModelSettings(path=tmp_path / "raw", device="cpu")).classify(faces)
    cooled = EmotionEngine.load(ModelSettings(path=tmp_path / "cooled", device="cpu")).classify(
        faces
    )
    for before, after in zip(raw, cooled, strict=True):
        assert before.label == after.label
        logits = torch.tensor([math.log(before.scores[label]) for label in FER_LABELS])
        expected = (logits / 4.0).softmax(dim=0)
        got = torch.tensor([after.scores[label] for label in FER_LABELS])
        assert torch.allclose(got, expected.float(), atol=1e-5)
    assert max(r.confidence for r in cooled) < max(r.confidence for r in raw)
    with pytest.raises(ValueError, match="positive"):
        fold_temperature(model, 0.0)
    model.lm_head.weight = model.get_input_embeddings().weight
    with pytest.raises(ValueError, match="tied"):
        fold_temperature(model, 2.0)


# --- the teacher ---------------------------------------------------------------------------


def test_teacher_learns_is_stored_as_safetensors_and_reused_only_for_the_same_key(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    examples, pixels, targets = _fer(8)
    config = TeacherConfig(
        widths=(8, 16), hidden=32, dropout=0.0, epochs=20, batch_size=28, augment=NO_AUGMENT
    )
    key = teacher_key(config, [e.path for e in examples], 0, 48)
    untrained = TeacherNet(config, len(FER_LABELS), 48)
    before = (teacher_logits(untrained, pixels, CPU).argmax(1) == targets).float().mean()
    teacher = train_teacher(
        config, pixels, targets, labels=FER_LABELS, seed=0, device=CPU,
        folder=tmp_path, key=key, emit=lambda _: None,
    )  # fmt: skip
    after = (teacher_logits(teacher, pixels, CPU).argmax(1) == targets).float().mean()
    assert float(after) >= 0.8 > float(before) + 0.3  # it fits its 56 training faces
    assert (tmp_path / TEACHER_FILE).read_bytes()[:8] != b"PK\x03\x04"  # not a pickle/zip
    log = [json.loads(line) for line in (tmp_path / "teacher_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(1, 21))
    reloaded = load_teacher(tmp_path, key, config, len(FER_LABELS), 48)
    assert reloaded is not None
    assert torch.equal(teacher_logits(reloaded, pixels, CPU), teacher_logits(teacher, pixels, CPU))
    other_faces = teacher_key(config, [e.path for e in examples[1:]], 0, 48)
    other_seed = teacher_key(config, [e.path for e in examples], 1, 48)
    assert len({key, other_faces, other_seed}) == 3
    assert load_teacher(tmp_path, other_faces, config, len(FER_LABELS), 48) is None
    assert load_teacher(tmp_path / "empty", key, config, len(FER_LABELS), 48) is None
    # RGB faces (the worker's crops) give the teacher the same answer as their gray source.
    rgb = pixels.expand(-1, 3, -1, -1)
    assert torch.allclose(teacher_logits(teacher, rgb, CPU), teacher_logits(teacher, pixels, CPU))


def test_training_with_a_teacher_and_calibration_keeps_the_validation_faces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--data", str(FER_FACES), "--arch", "tiny", "--threads", "1", "--epochs", "1"]
    distilled = [
        *common, "--teacher", str(tmp_path / "teacher"), "--teacher-epochs", "1",
        "--calibration-fraction", "0.1", "--select", "last",
    ]  # fmt: skip
    assert main([*distilled, "--out", str(tmp_path / "a")]) == 0
    assert "teacher: training 1 epochs" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    split = json.loads((tmp_path / "a" / "split.json").read_text())
    plain = json.loads((tmp_path / "plain" / "split.json").read_text())
    assert split["val"] == plain["val"]  # calibration comes out of the training part only
    assert sorted(split["train"] + split["calibration"]) == sorted(plain["train"])
    assert not set(split["calibration"]) & set(split["train"])
    examples = scan_folder(FER_FACES, FER_LABELS)
    outer = stratified_split(examples, 0.1, 0)
    assert len(split["calibration"]) == len(stratified_split(outer.train, 0.1, 0).val)
    args = json.loads((tmp_path / "a" / "training_args.json").read_text())
    assert args["calibration"]["faces"] == len(split["calibration"])
    assert args["calibration"]["temperature"] > 0
    assert args["teacher_summary"]["train_faces"] == len(split["train"])
    plain_args = json.loads((tmp_path / "plain" / "training_args.json").read_text())
    assert plain_args["calibration"] is None and plain_args["teacher_summary"] is None
    # A second run with the same faces and settings reuses the stored teacher.
    assert main([*distilled, "--out", str(tmp_path / "b")]) == 0
    assert "teacher: reusing" in capsys.readouterr().out


def test_command_line_refuses_bad_distillation_arguments(tmp_path: Path) -> None:
    common = ["--data", str(FER_FACES), "--out", str(tmp_path / "out")]
    assert main([*common, "--teacher", str(tmp_path), "--teacher-epochs", "0"]) == 2
    assert main([*common, "--distill-temperature", "0"]) == 2
    assert main([*common, "--calibration-fraction", "0.7"]) == 2
    assert main([*common, "--teacher", str(tmp_path), "--init", str(tmp_path)]) == 2
    assert not (tmp_path / "out").exists()


# --- test-time flip ------------------------------------------------------------------------


def test_flip_tta_averages_each_face_with_its_mirror_in_one_pass(tiny_checkpoint: Path) -> None:
    plain = EmotionEngine.load(ModelSettings(path=tiny_checkpoint, device="cpu"), max_batch_size=4)
    # Faces at the model's input size: mirroring the image is then exactly mirroring the
    # pixel values (a resize is not pixel-exact under a mirror).
    side = plain._prompt.pixel_shape[-1]
    faces = [
        Image.open(FER_FACES / e.path).convert("RGB").resize((side, side))
        for e in scan_folder(FER_FACES, FER_LABELS)[:6]
    ]
    flip = EmotionEngine.load(
        ModelSettings(path=tiny_checkpoint, device="cpu", tta="flip"), max_batch_size=4
    )
    calls: list[int] = []
    forward = flip._forward
    flip._forward = lambda pixels: calls.append(int(pixels.shape[0])) or forward(pixels)
    got = flip.classify(faces)
    assert calls == [8, 4]  # 6 faces in chunks of 4 and 2, each with its mirror alongside
    seen = plain.classify(faces)
    mirrored = plain.classify([ImageOps.mirror(face) for face in faces])
    for result, a, b in zip(got, seen, mirrored, strict=True):
        for label in FER_LABELS:
            expected = (a.scores[label] + b.scores[label]) / 2
            assert result.scores[label] == pytest.approx(expected, abs=1e-6)
        assert sum(result.scores.values()) == pytest.approx(1.0, abs=1e-9)
    # ...and the mirror is not the same answer, so the average is a real test.
    assert (
        max(
            abs(a.scores[label] - b.scores[label])
            for a, b in zip(seen, mirrored, strict=True)
            for label in FER_LABELS
        )
        > 1e-2
    )
    # A mirror-symmetric face scores the same with and without the flip.
    half = faces[0].crop((0, 0, side // 2, side))
    symmetric = Image.new("RGB", (side, side))
    symmetric.paste(half, (0, 0))
    symmetric.paste(ImageOps.mirror(half), (side // 2, 0))
    assert flip.classify([symmetric])[0].scores == pytest.approx(
        plain.classify([symmetric])[0].scores, abs=1e-6
    )


# --- resuming ------------------------------------------------------------------------------


class _StopError(Exception):
    pass


def test_an_interrupted_run_resumes_after_its_last_epoch_and_ends_as_an_unbroken_one(
    tmp_path: Path,
) -> None:
    from safetensors.torch import load_file

    from consumer.training.config import TrainConfig
    from consumer.training.loop import train
    from consumer.training.resume import RESUME_DIR

    def config(out: Path, **changes: object) -> TrainConfig:
        base = TrainConfig(
            data=FER_FACES, out=out, labels=FER_LABELS, prompt=DEFAULT_PROMPT, arch="tiny",
            epochs=3, threads=1, limit=120, select="last",
        )  # fmt: skip
        return replace(base, **changes)  # type: ignore[arg-type]

    def stop_at_epoch_two(line: str) -> None:
        if line.startswith("epoch 2/3:"):
            raise _StopError(line)

    whole = train(config(tmp_path / "whole"), log=lambda _: None)
    with pytest.raises(_StopError):
        train(config(tmp_path / "broken"), log=stop_at_epoch_two)
    assert (tmp_path / "broken" / RESUME_DIR / "state.safetensors").is_file()
    lines: list[str] = []
    # Other settings do not resume (and the command line may differ: it is not a setting).
    resumed = train(config(tmp_path / "broken", command="again"), log=lines.append)
    assert any(line.startswith("resuming after epoch 1") for line in lines)
    assert not any(line.startswith("epoch 1/3") for line in lines)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for a, b in zip(whole.history, resumed.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-4)
        assert a["val_accuracy"] == b["val_accuracy"]
    weights = [load_file(tmp_path / run / "model.safetensors") for run in ("whole", "broken")]
    for name, value in weights[0].items():
        assert torch.allclose(value, weights[1][name], atol=1e-5), name
    assert not (tmp_path / "broken" / RESUME_DIR).exists()  # cleared once finished
    log = (tmp_path / "broken" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2, 3]
    # A state saved with other settings is not used.
    with pytest.raises(_StopError):
        train(config(tmp_path / "other"), log=stop_at_epoch_two)
    lines.clear()
    train(config(tmp_path / "other", lr=5e-4), log=lines.append)
    assert any("other settings; starting afresh" in line for line in lines)
    assert any(line.startswith("epoch 1/3") for line in lines)
