"""`emotion-worker eval`: the metrics on inputs with known answers, the checkpoint identity,
the pictures, the selection of images, and one end-to-end run on the tiny checkpoint."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from consumer.config import FER_LABELS
from consumer.eval.cli import build_parser, main
from consumer.eval.dataset import EvalError, collect_samples, parse_class_map, read_split
from consumer.eval.identity import checkpoint_identity
from consumer.eval.metrics import EvalInputError, calibration, compute_metrics, confusion_matrix
from consumer.eval.plots import (
    RELIABILITY_SIZE,
    confusion_matrix_size,
    draw_confusion_matrix,
    write_confusion_matrix,
    write_reliability,
)
from tests.conftest import FER_CHECKPOINT, FER_FACES

ABC = ("a", "b", "c")


def _one_hot(labels: tuple[str, ...], predicted: list[str], top: float = 0.8) -> list[list[float]]:
    """Score vectors whose argmax is `predicted`, the rest shared equally."""
    rest = (1 - top) / (len(labels) - 1)
    return [[top if label == p else rest for label in labels] for p in predicted]


# ---- metrics -----------------------------------------------------------------------------


def test_perfect_predictions() -> None:
    truth = ["a", "b", "c", "a", "c"]
    m = compute_metrics(ABC, truth, truth, _one_hot(ABC, truth))
    assert m.accuracy == m.macro_f1 == m.macro_precision == m.macro_recall == 1.0
    assert m.top2_accuracy == 1.0
    assert m.confusion == ((2, 0, 0), (0, 1, 0), (0, 0, 2))
    assert [r.support for r in m.per_class] == [2, 1, 2]
    assert m.nll == pytest.approx(-math.log(0.8))
    # Every confidence is 0.8 and every answer right: one bin, gap 0.2.
    assert m.calibration.ece == pytest.approx(0.2)


def test_all_one_class_predicted() -> None:
    truth = ["a", "a", "b", "c"]
    predicted = ["a"] * 4
    m = compute_metrics(ABC, truth, predicted, _one_hot(ABC, predicted))
    a, b, c = m.per_class
    assert m.accuracy == 0.5
    assert (a.precision, a.recall, a.f1) == pytest.approx((0.5, 1.0, 2 / 3))
    # Never predicted: precision 0 (not NaN), so F1 0, and they still count in the average.
    assert (b.precision, b.recall, b.f1, b.predicted) == (0.0, 0.0, 0.0, 0)
    assert (c.precision, c.recall, c.f1) == (0.0, 0.0, 0.0)
    assert m.macro_f1 == pytest.approx((2 / 3) / 3)
    assert m.majority_baseline == 0.5


def test_three_classes_by_hand() -> None:
    truth = ["a", "a", "a", "b", "b", "c", "c", "c"]
    predicted = ["a", "b", "b", "b", "c", "c", "c", "a"]
    # Rows true, columns predicted:   a  b  c
    #                              a [1, 2, 0]
    #                              b [0, 1, 1]
    #                              c [1, 0, 2]
    # precision a 1/2, b 1/3, c 2/3; recall a 1/3, b 1/2, c 2/3
    # F1 a = 2(1/2)(1/3)/(5/6) = 2/5, b = 2/5, c = 2/3; macro-F1 = (2/5 + 2/5 + 2/3)/3 = 22/45
    m = compute_metrics(ABC, truth, predicted, _one_hot(ABC, predicted))
    assert m.confusion == ((1, 2, 0), (0, 1, 1), (1, 0, 2))
    assert m.accuracy == 0.5
    assert [r.precision for r in m.per_class] == pytest.approx([1 / 2, 1 / 3, 2 / 3])
    assert [r.recall for r in m.per_class] == pytest.approx([1 / 3, 1 / 2, 2 / 3])
    assert [r.f1 for r in m.per_class] == pytest.approx([2 / 5, 2 / 5, 2 / 3])
    assert m.macro_f1 == pytest.approx(22 / 45)
    assert m.macro_precision == pytest.approx((1 / 2 + 1 / 3 + 2 / 3) / 3)


def test_label_absent_everywhere_is_left_out_of_macro_averages() -> None:
    labels = ("a", "b", "c", "d")
    truth = ["a", "b", "b"]
    m = compute_metrics(labels, truth, truth, _one_hot(labels, truth))
    assert m.macro_f1 == 1.0
    assert m.per_class[3].support == m.per_class[3].predicted == 0
    assert m.confusion[3] == (0, 0, 0, 0)


def test_top2_nll_and_brier() -> None:
    scores = [[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]
    m = compute_metrics(ABC, ["b", "c"], ["a", "a"], scores)
    assert m.accuracy == 0.0
    assert m.top2_accuracy == 0.5  # b is second for the first; c is last for the second
    assert m.nll == pytest.approx((-math.log(0.3) - math.log(0.1)) / 2)
    brier_1 = 0.5**2 + 0.7**2 + 0.2**2
    brier_2 = 0.6**2 + 0.3**2 + 0.9**2
    assert m.brier == pytest.approx((brier_1 + brier_2) / 2)


def test_ece_on_a_constructed_case() -> None:
    # 4 faces at confidence 0.9, 3 right (gap 0.15); 4 at 0.5, 2 right (gap 0).
    confidences = [0.9] * 4 + [0.5] * 4
    correct = [True, True, True, False, True, True, False, False]
    result = calibration(confidences, correct, bins=15)
    assert result.ece == pytest.approx(0.15 * 4 / 8)
    assert result.mce == pytest.approx(0.15)
    used = {i: b for i, b in enumerate(result.bins) if b.count}
    assert set(used) == {7, 13}  # 0.5 in (7/15, 8/15], 0.9 in (13/15, 14/15]
    assert used[13].accuracy == 0.75 and used[13].confidence == pytest.approx(0.9)
    assert sum(b.count for b in result.bins) == 8
    assert result.bins[0].count == 0 and result.bins[0].accuracy is None


def test_ece_bin_edges() -> None:
    # Bins are (i/B, (i+1)/B]: an edge belongs to the bin below it; 0 goes to the first.
    result = calibration([0.0, 1 / 15, 2 / 15, 1.0], [True] * 4, bins=15)
    assert [b.count for b in result.bins[:3]] == [2, 1, 0]
    assert result.bins[-1].count == 1
    with pytest.raises(EvalInputError):
        calibration([1.5], [True])


def test_metrics_refuse_mismatched_inputs() -> None:
    with pytest.raises(EvalInputError, match="not one of the labels"):
        confusion_matrix(ABC, ["a"], ["z"])
    with pytest.raises(EvalInputError, match="length"):
        compute_metrics(ABC, ["a", "b"], ["a"], [[1, 0, 0]])
    with pytest.raises(EvalInputError, match="no examples"):
        compute_metrics(ABC, [], [], [])


# ---- checkpoint identity -----------------------------------------------------------------


def _checkpoint(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llava"}')
    (folder / "model.safetensors").write_bytes(b"\x00\x01weights")
    (folder / "sub" / "extra.txt").write_text("x")
    (folder / ".marker.json").write_text("bookkeeping")
    return folder


def test_identity_is_stable_and_content_based(tmp_path: Path) -> None:
    first = checkpoint_identity(_checkpoint(tmp_path / "one"))
    assert first == checkpoint_identity(tmp_path / "one")
    # The same files elsewhere: the same identity (paths are relative).
    assert checkpoint_identity(_checkpoint(tmp_path / "two"))["sha256"] == first["sha256"]
    assert [f["path"] for f in first["files"]] == [
        "config.json",
        "model.safetensors",
        "sub/extra.txt",
    ]
    # Dot-files are bookkeeping, not the model.
    (tmp_path / "one" / ".marker.json").write_text("changed")
    assert checkpoint_identity(tmp_path / "one")["sha256"] == first["sha256"]


def test_identity_changes_with_any_model_file(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path / "ckpt")
    before = checkpoint_identity(folder)["sha256"]
    (folder / "model.safetensors").write_bytes(b"\x00\x01weightz")
    after = checkpoint_identity(folder)["sha256"]
    assert after != before
    (folder / "sub" / "extra.txt").rename(folder / "sub" / "renamed.txt")
    assert checkpoint_identity(folder)["sha256"] not in (before, after)


def test_identity_leaves_out_the_model_card_and_training_records(tmp_path: Path) -> None:
    """The card and the training records describe the weights; editing them keeps the
    identity (and so the eval report of those weights). What the model computes with
    (config, weights) changes it."""
    folder = _checkpoint(tmp_path / "ckpt")
    records = ("training_args.json", "train_log.jsonl", "split.json", "eval_report.json")
    for name in ("README.md", *records):
        (folder / name).write_text("first")
    (folder / "sub" / "NOTES.md").write_text("first")
    before = checkpoint_identity(folder)
    assert [f["path"] for f in before["files"]] == [
        "config.json",
        "model.safetensors",
        "sub/extra.txt",
    ]
    assert "*.md" in before["method"] and "training_args.json" in before["method"]
    for name in ("README.md", "sub/NOTES.md", *records):
        (folder / name).write_text("edited")
        assert checkpoint_identity(folder)["sha256"] == before["sha256"], name
    (folder / "config.json").write_text('{"model_type": "llava", "edited": true}')
    config_edited = checkpoint_identity(folder)["sha256"]
    assert config_edited != before["sha256"]
    (folder / "model.safetensors").write_bytes(b"\x00\x01weightz")
    assert checkpoint_identity(folder)["sha256"] not in (before["sha256"], config_edited)


# ---- pictures ----------------------------------------------------------------------------


def test_confusion_matrix_png(tmp_path: Path) -> None:
    matrix = [[10 if i == j else i for j in range(7)] for i in range(7)]
    path = write_confusion_matrix(FER_LABELS, matrix, tmp_path / "cm.png", title="test")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == confusion_matrix_size(FER_LABELS)
        assert len(image.convert("RGB").getcolors(1 << 16) or []) > 20  # drawn, not blank
    # Longer labels make wider cells, and the layout function knows it.
    long = ("a-very-long-label-name", "b")
    assert confusion_matrix_size(long)[0] > confusion_matrix_size(("a", "b"))[0]
    assert draw_confusion_matrix(long, [[1, 0], [0, 0]]).size == confusion_matrix_size(long)
    with pytest.raises(ValueError, match="2x2"):
        draw_confusion_matrix(("a", "b"), [[1, 0]])


def test_reliability_png(tmp_path: Path) -> None:
    result = calibration([0.9] * 4 + [0.5] * 4 + [0.2], [True, True, True, False] + [True] * 5)
    path = write_reliability(result.bins, result.ece, tmp_path / "rel.png", title="test")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == RELIABILITY_SIZE
        assert len(image.convert("RGB").getcolors(1 << 16) or []) > 20


# ---- choosing the images -----------------------------------------------------------------


def _folder(root: Path, counts: dict[str, int]) -> Path:
    source = sorted(FER_FACES.joinpath("happy").glob("*.png"))
    k = 0
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shutil.copy(source[k], root / name / f"{i:03d}.png")
            k += 1
    return root


def test_collect_per_class_limit_and_seed(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", {"angry": 6, "happy": 3, "sad": 0})
    (data / ".ipynb_checkpoints").mkdir()  # hidden: ignored, not an unknown class
    every = collect_samples(data, FER_LABELS)
    assert len(every) == 9 and {s.label for s in every} == {"angry", "happy"}
    picked = collect_samples(data, FER_LABELS, per_class=2, seed=1)
    assert [s.label for s in picked].count("angry") == 2 and len(picked) == 4
    assert picked == collect_samples(data, FER_LABELS, per_class=2, seed=1)
    assert len(collect_samples(data, FER_LABELS, limit=5, seed=3)) == 5
    others = {
        tuple(s.relative for s in collect_samples(data, FER_LABELS, limit=5, seed=k))
        for k in range(6)
    }
    assert len(others) > 1  # the seed matters


def test_unknown_class_folder_is_named(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", {"angry": 1, "bored": 1})
    with pytest.raises(EvalError, match=r"'bored'.*--class-map bored=LABEL"):
        collect_samples(data, FER_LABELS)
    mapped = collect_samples(data, FER_LABELS, class_map=parse_class_map(["bored=neutral"]))
    assert {s.label for s in mapped} == {"angry", "neutral"}
    assert collect_samples(data, ("angry", "bored"))[1].label == "bored"  # --labels


def test_empty_and_flat_folders(tmp_path: Path) -> None:
    (tmp_path / "empty" / "happy").mkdir(parents=True)
    with pytest.raises(EvalError, match="no images found"):
        collect_samples(tmp_path / "empty", FER_LABELS)
    with pytest.raises(EvalError, match="does not exist"):
        collect_samples(tmp_path / "missing", FER_LABELS)
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next(FER_FACES.joinpath("sad").glob("*.png")), flat / "face.png")
    with pytest.raises(EvalError, match="outside any class folder"):
        collect_samples(flat, FER_LABELS)


def test_split_files(tmp_path: Path) -> None:
    data = _folder(tmp_path / "data", {"angry": 3, "happy": 3})
    split = tmp_path / "split.json"
    split.write_text(
        json.dumps({"train": ["angry/000.png"], "val": ["happy/001.png", "angry/002.png"]})
    )
    val = collect_samples(data, FER_LABELS, split_paths=read_split(split, None))
    assert [s.relative for s in val] == ["angry/002.png", "happy/001.png"]
    assert [
        s.relative
        for s in collect_samples(data, FER_LABELS, split_paths=read_split(split, "train"))
    ] == ["angry/000.png"]
    with pytest.raises(EvalError, match="no list 'test'"):
        read_split(split, "test")
    text = tmp_path / "val.txt"
    text.write_text("# the validation faces\nhappy/000.png\n\nhappy/000.png\n")
    assert read_split(text, None) == ["happy/000.png"]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(["angry/001.png", "angry/404.png"]))
    with pytest.raises(EvalError, match=r"1 of 2 paths .*angry/404\.png"):
        collect_samples(data, FER_LABELS, split_paths=read_split(listed, None))


def test_config_supplies_model_settings(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from consumer.eval.evaluate import worker_settings

    config = tmp_path / "worker.toml"
    config.write_text(
        '[model]\nanswer_words = ["a1", "b1", "c1", "d1", "e1", "f1", "g1"]\ndevice = "cuda"\n'
    )
    args = build_parser().parse_args(
        [
            "--config",
            str(config),
            "--model",
            str(tiny_checkpoint),
            "--data",
            "x",
            "--out",
            "y",
            "--device",
            "cpu",
        ]
    )
    model = worker_settings(args).model
    assert model.answer_words == ("a1", "b1", "c1", "d1", "e1", "f1", "g1")
    assert model.device == "cpu" and model.path == tiny_checkpoint  # flags beat the file


# ---- the command -------------------------------------------------------------------------


def test_bad_inputs_exit_2(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _folder(tmp_path / "data", {"angry": 1, "bored": 1})
    common = ["--model", str(tiny_checkpoint), "--out", str(tmp_path / "out")]
    assert main([*common, "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "class folder 'bored'" in err and "emotion-worker eval: error" in err
    (tmp_path / "empty").mkdir()
    assert main([*common, "--data", str(tmp_path / "empty")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["--data", str(data), "--out", "x"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main([*common, "--data", str(data), "--per-class", "0"]) == 2
    assert main([*common, "--data", str(data), "--device", "tpu"]) == 2  # argparse's own
    assert main(["--help"]) == 0
    assert "--split-file" in capsys.readouterr().out
    missing_model = ["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]
    assert main([*missing_model, "--data", str(_folder(tmp_path / "ok", {"sad": 1}))]) == 2
    assert "configuration error" in capsys.readouterr().err


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> dict[str, Any]:
    """One real run through the CLI: 4 FER faces per class, one of disgusted's undecodable."""
    from consumer.cli import main as cli_main

    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    for class_dir in sorted(p for p in FER_FACES.iterdir() if p.is_dir()):
        (data / class_dir.name).mkdir(parents=True)
        # disgusted: exactly four files, so --per-class 4 always picks the broken one
        take = 3 if class_dir.name == "disgusted" else 6
        for image in sorted(class_dir.glob("*.png"))[:take]:
            shutil.copy(image, data / class_dir.name / image.name)
    (data / "disgusted" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png at all")
    out = root / "out"
    argv = [
        "--model",
        str(tiny_checkpoint),
        "--data",
        str(data),
        "--out",
        str(out),
        "--per-class",
        "4",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--seed",
        "7",
    ]
    # "--": the top-level parser's REMAINDER does not take a leading option otherwise.
    code = cli_main(["eval", "--", *argv])
    return {"code": code, "out": out, "report": json.loads((out / "report.json").read_text())}


def test_end_to_end_report_is_consistent(eval_run: dict[str, Any]) -> None:
    assert eval_run["code"] == 0
    report, out = eval_run["report"], eval_run["out"]
    m = report["metrics"]
    n = report["data"]["images"]
    skipped = report["data"]["skipped_count"]
    assert report["data"]["selected"] == 28 and skipped == 1 and n == 27
    assert m["count"] == n == sum(row["support"] for row in m["per_class"].values())
    counts = m["confusion_matrix"]["counts"]
    assert sum(map(sum, counts)) == n
    assert m["accuracy"] == pytest.approx(sum(counts[i][i] for i in range(7)) / n)
    assert m["labels"] == list(FER_LABELS)
    assert sum(b["count"] for b in m["calibration"]["per_bin"]) == n
    assert len(m["calibration"]["per_bin"]) == 15
    assert (
        report["model"]["identity"]["sha256"]
        == checkpoint_identity(Path(report["model"]["path"]))["sha256"]
    )
    assert (
        report["timing"]["engine_images_per_s"] > 0
        and report["timing"]["end_to_end_images_per_s"] > 0
    )
    assert {"torch", "transformers"} <= set(report["versions"])
    predictions = (out / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == n
    row = json.loads(predictions[0])
    assert row["predicted"] == max(row["scores"], key=row["scores"].get)
    markdown = (out / "report.md").read_text()
    for heading in ("## Summary", "## Per class", "## Confusion matrix", "## Calibration"):
        assert heading in markdown
    assert report["model"]["identity"]["sha256"] in markdown
    with Image.open(out / "confusion_matrix.png") as image:
        assert image.size == confusion_matrix_size(FER_LABELS)
    with Image.open(out / "reliability.png") as image:
        assert image.size == RELIABILITY_SIZE


def test_undecodable_image_is_skipped_and_listed(eval_run: dict[str, Any]) -> None:
    report = eval_run["report"]
    [skipped] = report["data"]["skipped"]
    assert skipped["path"] == "disgusted/broken.png" and "cannot be decoded" in skipped["error"]
    assert report["data"]["selected_per_label"]["disgusted"] == 4
    assert report["metrics"]["per_class"]["disgusted"]["support"] == 3
    assert "## Skipped images" in (eval_run["out"] / "report.md").read_text()


def test_missing_data_folder_is_one_line_naming_the_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from consumer.eval.dataset import missing_data_message

    missing = tmp_path / "fer2013" / "train"
    out = tmp_path / "report"
    argv = ["--model", str(FER_CHECKPOINT), "--data", str(missing), "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"emotion-worker eval: error: {missing_data_message(missing)}\n"
    for part in (f"--data {missing} does not exist", "emotion-detection-fer", "ICML 2013"):
        assert part in err, part
    assert "one folder of images per class (angry/, disgusted/" in err
    assert "data/faces are enough" in err
    assert not out.exists()  # stopped before writing anything


def test_report_paths_are_relative_inside_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from consumer.eval.report import report_path

    (tmp_path / "work" / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert report_path(Path("models/m")) == "models/m"
    assert report_path(tmp_path / "work" / "models" / "m") == "models/m"
    # Outside it: as given on the command line, not resolved into this machine's layout.
    assert report_path(Path("../fer2013/train")) == "../fer2013/train"
    assert report_path(tmp_path / "elsewhere") == str(tmp_path / "elsewhere")


def test_class_map_flag() -> None:
    args = build_parser().parse_args(
        ["--data", "d", "--out", "o", "--class-map", "disgust=disgusted,fear=fearful"]
    )
    assert parse_class_map(args.class_map) == {"disgust": "disgusted", "fear": "fearful"}
    with pytest.raises(EvalError, match="FOLDER=LABEL"):
        parse_class_map(["disgust"])
