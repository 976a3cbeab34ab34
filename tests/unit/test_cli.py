"""The command line: mistakes exit 2 with a message that names the field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.cli import main


def test_missing_checkpoint_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-model"
    assert main(["run", "--model-path", str(missing), "--log-level", "error"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "configuration error" in err


def test_invalid_flag_value_names_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--max-batch-size", "0"]) == 2
    assert "batch.max_batch_size" in capsys.readouterr().err


def test_unknown_key_in_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[kafka]\nbootstrap_server = "x:9092"\n')
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "kafka.bootstrap_server" in err and "Extra inputs" in err


def test_pickled_weights_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llava"}')
    (model / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    assert main(["run", "--model-path", str(model), "--log-level", "error"]) == 2
    assert "safetensors" in capsys.readouterr().err


def test_make_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "tiny"
    assert main(["make-tiny-model", str(target)]) == 0
    assert (target / "config.json").is_file() and list(target.glob("*.safetensors"))


def test_stop_signals_graceful_then_immediate(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    from consumer.cli import StopSignals

    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        stop = StopSignals()
        with pytest.raises(SystemExit) as early:
            stop._handle(signal.SIGTERM, None)  # during model load: leave at once
        assert early.value.code == 0
        stop = StopSignals()
        calls: list[str] = []
        stop.on_stop(lambda: calls.append("drain"))
        stop._handle(signal.SIGTERM, None)
        assert calls == ["drain"]
        exits: list[int] = []
        monkeypatch.setattr("os._exit", exits.append)
        stop._handle(signal.SIGTERM, None)  # second signal: exit now, commit nothing
        assert exits == [128 + signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
