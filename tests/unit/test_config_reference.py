"""docs/configuration.md: generated from the settings model, complete, and up to date."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel, SecretStr

from consumer.config import WorkerSettings
from consumer.config import reference as config_reference
from consumer.config.reference import env_var, render, sections, settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _row(setting: str) -> list[str]:
    """The cells of the table row of one setting."""
    for line in render().splitlines():
        if line.startswith(f"| `{setting}` |"):
            return [cell.strip() for cell in line.strip("|").split(" | ")]
    raise AssertionError(f"no row for {setting}")


def _all_fields(prefix: str, model: type[BaseModel]) -> list[str]:
    """Every leaf setting of the model, walked independently of config_reference."""
    names = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += _all_fields(dotted, annotation)
        else:
            names.append(dotted)
    return names


def test_committed_reference_is_up_to_date() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/configuration.md is out of date with consumer/config/: run `make docs` "
        "(python -m consumer.config.reference > docs/configuration.md) and commit the file"
    )


def test_every_setting_appears_with_its_environment_variable() -> None:
    text = render()
    names = _all_fields("", WorkerSettings)
    assert [name for name, _ in settings()] == names
    assert len(names) > 60
    for name in names:
        variable = "EMOTION_WORKER_" + name.replace(".", "__").upper()
        assert env_var(name) == variable
        assert f"| `{name}` |" in text, name
        assert _row(name)[3] == f"`{variable}`"
    assert "EMOTION_WORKER_FETCH__S3__SECRET_ACCESS_KEY" in text


def test_every_section_has_a_heading_and_a_docstring() -> None:
    text = render()
    listed = [name for name, _ in sections()]
    assert listed[:4] == ["kafka", "model", "batch", "fetch"]
    assert "fetch.s3" in listed and "log" in listed
    for name, model in sections():
        assert f"\n## `{name}`\n" in text
        assert (model.__doc__ or "").strip(), f"{model.__name__} has no docstring"


def test_every_setting_has_a_description() -> None:
    """A setting added without `description=` fails here (and so is never undocumented)."""
    missing = [name for name, field in settings() if not (field.description or "").strip()]
    assert not missing, f"settings without a description in consumer/config/: {missing}"
    for name, _ in settings():
        assert _row(name)[4], name


def test_types_and_constraints_are_rendered() -> None:
    assert _row("batch.max_batch_size")[1] == "int ≥ 1, ≤ 1024"
    assert _row("kafka.poll_timeout_s")[1] == "float > 0, ≤ 5"
    guarantee = _row("kafka.processing_guarantee")[1]
    assert "at_least_once" in guarantee and "exactly_once" in guarantee
    assert guarantee.startswith("one of:")
    assert _row("kafka.group_instance_id")[1].startswith("optional str")
    assert "249" in _row("kafka.group_instance_id")[1]
    assert _row("kafka.common_config")[1].startswith("table of str")
    assert _row("fetch.allow_hosts")[1] == "list of str"
    assert _row("fetch.file_roots")[1] == "list of path"
    assert _row("processes.devices")[1] == "one of: single, auto; or list of str"


def test_defaults_are_rendered() -> None:
    assert _row("kafka.bootstrap_servers")[2] == "`127.0.0.1:9092`"
    assert _row("kafka.group_instance_id")[2] == "none"
    assert _row("kafka.common_config")[2] == "`{}`"
    assert _row("fetch.allow_hosts")[2] == "`[]`"
    assert _row("model.precision")[2] == "`auto`"
    assert _row("fetch.max_bytes")[2] == f"`{20 * 1024 * 1024}`"
    assert _row("model.labels")[2].startswith('`["angry", "disgusted"')


def test_secrets_are_never_rendered_as_values() -> None:
    row = _row("fetch.s3.secret_access_key")
    assert "secret" in row[1]
    assert row[2] == "none"
    assert config_reference._json_ish(SecretStr("hunter2")) == "(secret)"
    assert "hunter2" not in config_reference._json_ish({"key": SecretStr("hunter2")})


def test_output_is_deterministic() -> None:
    assert render() == render()
    order = [name for name, _ in settings()]
    rows = re.findall(r"^\| `([a-z0-9_.]+)` \|", render(), flags=re.MULTILINE)
    assert rows == order


def test_check_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("# old\n", encoding="utf-8")
    monkeypatch.setattr(config_reference, "DOC_PATH", stale)
    assert config_reference.main(["--check"]) == 1
    assert "make docs" in capsys.readouterr().err
    stale.write_text(render(), encoding="utf-8")
    assert config_reference.main(["--check"]) == 0
