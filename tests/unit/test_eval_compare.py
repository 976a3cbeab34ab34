"""`emotion-worker eval --compare A B`: the side syntax and its errors, the agreement numbers
on hand-made answers, and real comparisons on the shipped small checkpoint (a setting
against itself, float32 against bfloat16), one engine in memory at a time."""

from __future__ import annotations

import json
import math
import re
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consumer.config import FER_LABELS, ConfigError, ModelSettings
from consumer.eval.agreement import compare_predictions, mcnemar_p, percentile
from consumer.eval.classify import Predictions
from consumer.eval.cli import main
from consumer.eval.compare import parse_side, split_items
from consumer.eval.markdown import render_compare_markdown
from tests.conftest import FER_CHECKPOINT, FER_FACES

ABC = ("a", "b", "c")


# ---- the side syntax ---------------------------------------------------------------------


def test_split_items_keeps_json_values_whole() -> None:
    assert split_items("dtype=bfloat16, compile=off,") == ["dtype=bfloat16", "compile=off"]
    assert split_items('answer_words=["x","y,z"],prompt="a, \\"b\\", c",device=cpu') == [
        'answer_words=["x","y,z"]',
        'prompt="a, \\"b\\", c"',
        "device=cpu",
    ]
    assert split_items("") == []


def test_parse_side_takes_any_model_field() -> None:
    side = parse_side("A", 'model.dtype=bfloat16,path=models/x,answer_words=["p","q"]')
    assert side.overrides == {"dtype": "bfloat16", "path": "models/x", "answer_words": ["p", "q"]}
    assert side.folder == "a"
    assert parse_side("B", "").overrides == {}
    # Every field of the settings model is a key, whatever fields it has.
    for field in ModelSettings.model_fields:
        assert field in parse_side("A", f"{field}=x").overrides


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("nosuch=1", r"'nosuch' is not a model setting; the model settings are path, "),
        ("dtyp=float32", r"'dtyp' is not a model setting; did you mean dtype\?"),
        ("bfloat16", r"'bfloat16' is not KEY=VALUE; .*e\.g\. \"dtype=bfloat16,compile=off\""),
        ("dtype=float32,dtype=bfloat16", r"model\.dtype is given twice"),
        ("labels=[oops", r"model\.labels: '\[oops' is not valid JSON"),
    ],
)
def test_parse_side_errors_name_the_key_and_the_fix(spec: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=rf"^--compare A {re.escape(repr(spec))}: .*{expected}"):
        parse_side("A", spec)


def test_a_removed_setting_is_explained_by_the_settings_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key the settings model knows as removed or renamed gets its message, not the list."""
    from pydantic import model_validator
    from pydantic_core import PydanticCustomError

    import consumer.eval.compare as compare_module

    class Renamed(ModelSettings):
        @model_validator(mode="before")
        @classmethod
        def _old_name(cls, data: Any) -> Any:
            if isinstance(data, dict) and "old_name" in data:
                raise PydanticCustomError("removed", "model.old_name became model.new_name")
            return data

    monkeypatch.setattr(compare_module, "ModelSettings", Renamed)
    with pytest.raises(
        ConfigError, match=r"^--compare A 'old_name=1': model\.old_name became model\.new_name$"
    ):
        parse_side("A", "old_name=1")
    with pytest.raises(ConfigError, match="'other' is not a model setting"):
        parse_side("A", "other=1")


def _args(*extra: str, out: Path) -> list[str]:
    return ["--data", str(FER_FACES), "--out", str(out), "--device", "cpu", *extra]


@pytest.mark.parametrize(
    ("sides", "expected"),
    [
        (["nosuch=1", "dtype=float32"], "--compare A 'nosuch=1': 'nosuch' is not a model setting"),
        (
            ["dtype=float32", "dtype=float64"],
            "--compare B 'dtype=float64': setting model.dtype: Input should be 'auto', "
            "'float32', 'bfloat16' or 'float16' (got 'float64')",
        ),
        (
            ["", 'labels=["happy","sad"]'],
            "--compare: the sides have different model.labels",
        ),
    ],
)
def test_bad_sides_exit_2_with_one_line_before_any_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sides: list[str], expected: str
) -> None:
    out = tmp_path / "out"
    argv = ["--model", str(FER_CHECKPOINT), *_args("--compare", *sides, out=out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"emotion-worker eval: configuration error: {expected}"), err
    assert err.count("\n") == 1
    assert not out.exists()  # refused before the data was read or a model loaded


def test_compare_without_a_checkpoint_says_how_to_give_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_args("--compare", "dtype=float32", "", out=tmp_path / "out")) == 2
    assert "--model" in capsys.readouterr().err


# ---- the numbers, on hand-made answers ----------------------------------------------------


def _predictions(predicted: list[str], scores: list[list[float]], truth: list[str]) -> Predictions:
    paths = [f"{t}/{i}.png" for i, t in enumerate(truth)]
    return Predictions(paths, truth, predicted, scores, [])


def test_mcnemar_and_percentile_against_independent_formulas() -> None:
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_p(7, 1) == pytest.approx(2 * (1 + 8) / 256)
    assert mcnemar_p(3, 3) == 1.0
    assert 0 < mcnemar_p(2000, 1500) < 1e-15  # 3500 faces: no float overflow
    values = [0.3, 0.0, 1.0, 0.25, 0.7, 0.1]
    for q in (0, 50, 95, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_agreement_on_constructed_answers() -> None:
    truth = ["a", "b", "c", "a"]
    a = _predictions(
        ["a", "b", "c", "b"],
        [[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.3, 0.5, 0.2]],
        truth,
    )
    # B: same scores on faces 0 and 2, face 1 flips to c, face 3 to a (now right).
    b = _predictions(
        ["a", "c", "c", "a"],
        [[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.5, 0.3, 0.2]],
        truth,
    )
    result = compare_predictions(ABC, a, b)
    assert result["faces"] == 4 and result["unmatched"] == 0
    assert result["agreement"]["agree"] == 2 and result["agreement"]["rate"] == 0.5
    assert result["agreement"]["matrix"]["counts"] == [[1, 0, 0], [1, 0, 1], [0, 0, 1]]
    assert result["agreement"]["per_label"]["b"] == {
        "a_predicted": 2,
        "b_predicted": 0,
        "both": 0,
        "agreement": 0.0,
        "mean_abs_diff": pytest.approx((0.4 + 0.2) / 4),
    }
    scores = result["scores"]
    assert scores["max_abs_diff"] == pytest.approx(0.4)
    assert scores["max_abs_diff_face"] == "b/1.png"
    assert scores["mean_abs_diff"] == pytest.approx((0.4 + 0.4 + 0.2 + 0.2) / 12)
    truth_split = result["truth"]
    assert (truth_split["a_correct"], truth_split["b_correct"]) == (3, 3)
    assert (truth_split["only_a_correct"], truth_split["only_b_correct"]) == (1, 1)
    assert [row["path"] for row in result["disagreements"]] == ["b/1.png", "a/3.png"]
    # A face missing from one run (a file changed between them) is counted, not compared.
    shorter = Predictions(b.relative[:3], b.truth[:3], b.predicted[:3], b.scores[:3], [])
    assert compare_predictions(ABC, a, shorter)["unmatched"] == 1


# ---- real comparisons on the shipped small checkpoint --------------------------------------


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    out = tmp_path / "out"
    code = main([*_args("--per-class", "4", "--batch-size", "8", *argv, out=out)])
    # The last three lines: the engine may log to stdout before them.
    summary = "\n".join(capsys.readouterr().out.splitlines()[-3:])
    comparison = json.loads((out / "compare.json").read_text()) if code == 0 else {}
    return {"code": code, "out": out, "summary": summary, "comparison": comparison}


def _rows(path: Path) -> dict[str, dict[str, Any]]:
    return {row["path"]: row for row in map(json.loads, path.read_text().splitlines())}


def test_a_setting_against_itself_agrees_exactly_one_engine_at_a_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from consumer.engine import EmotionEngine

    loaded: list[weakref.ref[Any]] = []
    original = EmotionEngine.load

    def load(settings: ModelSettings, **kwargs: Any) -> EmotionEngine:
        # When B loads, A's model must be gone: a pair of 7B models needs one GPU's memory.
        assert all(ref() is None for ref in loaded), "the previous engine is still in memory"
        engine = original(settings, **kwargs)
        loaded.append(weakref.ref(engine.model))
        return engine

    monkeypatch.setattr(EmotionEngine, "load", load)
    side = f"path={FER_CHECKPOINT}"  # no --model: each side names its checkpoint
    result = _run(tmp_path, capsys, "--compare", side, side)
    assert result["code"] == 0 and len(loaded) == 2
    comparison, out = result["comparison"], result["out"]
    assert comparison["faces"] == 28 and comparison["differs"] == {}
    assert comparison["agreement"]["rate"] == 1.0
    assert comparison["scores"]["max_abs_diff"] == 0.0
    assert comparison["truth"]["mcnemar_p"] == 1.0 and comparison["disagreements"] == []
    a, b = comparison["sides"]["A"], comparison["sides"]["B"]
    assert a["model"]["sha256"] == b["model"]["sha256"]
    assert a["metrics"] == b["metrics"]
    for name in ("a", "b"):
        for file in ("report.json", "report.md", "predictions.jsonl", "confusion_matrix.png"):
            assert (out / name / file).is_file(), (name, file)
    assert _rows(out / "a" / "predictions.jsonl") == _rows(out / "b" / "predictions.jsonl")
    assert "same label 100.00% (28/28), score difference max 0.0000" in result["summary"]
    assert "same label | 100.00% (28 of 28)" in (out / "compare.md").read_text()


def test_float32_against_bfloat16(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(
        tmp_path,
        capsys,
        "--model",
        str(FER_CHECKPOINT),
        "--compare",
        "dtype=float32,compile=off",
        "model.dtype=bfloat16,compile=off",
    )
    assert result["code"] == 0
    comparison, out = result["comparison"], result["out"]
    assert comparison["differs"] == {"dtype": {"A": "float32", "B": "bfloat16"}}
    sides = comparison["sides"]
    assert (sides["A"]["model"]["dtype"], sides["B"]["model"]["dtype"]) == ("float32", "bfloat16")
    # Independently, from the two runs' own predictions.jsonl.
    a_rows = _rows(out / "a" / "predictions.jsonl")
    b_rows = _rows(out / "b" / "predictions.jsonl")
    assert a_rows.keys() == b_rows.keys() and len(a_rows) == comparison["faces"] == 28
    diffs = [
        abs(a_rows[p]["scores"][label] - b_rows[p]["scores"][label])
        for p in a_rows
        for label in FER_LABELS
    ]
    agree = sum(a_rows[p]["predicted"] == b_rows[p]["predicted"] for p in a_rows)
    assert comparison["agreement"]["agree"] == agree
    assert comparison["scores"]["max_abs_diff"] == pytest.approx(max(diffs), abs=1e-12)
    assert comparison["scores"]["mean_abs_diff"] == pytest.approx(
        math.fsum(diffs) / len(diffs), abs=1e-12
    )
    for name, rows in (("A", a_rows), ("B", b_rows)):
        right = sum(row["true"] == row["predicted"] for row in rows.values())
        assert sides[name]["metrics"]["accuracy"] == pytest.approx(right / len(rows))
    # Plausible for bfloat16's 8-bit mantissa: the scores move, by little, labels rarely.
    assert 0 < comparison["scores"]["max_abs_diff"] < 0.1
    assert comparison["agreement"]["rate"] >= 0.9
    for side in sides.values():
        assert side["speed"]["engine_images_per_s"] > 0 and side["speed"]["median_batch_ms"] > 0
        assert side["speed"]["batches"] == 4
    # The summary and compare.md say what compare.json holds.
    rate = f"{100 * comparison['agreement']['rate']:.2f}%"
    assert f"same label {rate}" in result["summary"]
    assert f"max {comparison['scores']['max_abs_diff']:.4f}" in result["summary"]
    assert result["summary"].startswith("A (dtype=float32,compile=off): accuracy ")
    markdown = (out / "compare.md").read_text()
    assert f"| same label | {rate} ({agree} of 28) |" in markdown
    assert "| device / dtype | cpu / float32 | cpu / bfloat16 |" in markdown
    assert "Settings that differ: `dtype`." in markdown

    # The disagreement table, rendered from hand-made answers in the same comparison.
    labels = list(FER_LABELS)
    a = _predictions(["happy", "sad"], [[0.1] * 3 + [0.4, 0.0, 0.2, 0.1]] * 2, ["happy"] * 2)
    b = _predictions(["happy", "angry"], [[0.1] * 3 + [0.4, 0.0, 0.2, 0.1]] * 2, ["happy"] * 2)
    made = {**comparison, **compare_predictions(labels, a, b)}
    text = render_compare_markdown(made)
    assert "## Faces they disagree on" in text
    assert "| `happy/1.png` | happy | sad | angry |" in text
