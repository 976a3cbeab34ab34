"""file:// is off until fetch.file_roots names folders: the hints `check` and `produce` give."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer.config import FetchSettings, WorkerSettings, load_settings
from consumer.event_source import file_roots_problem
from consumer.preflight import check_file_roots, format_result


def settings(*roots: Path | str) -> WorkerSettings:
    return WorkerSettings(fetch=FetchSettings(file_roots=tuple(Path(r) for r in roots)))


def test_the_default_reads_no_file() -> None:
    assert FetchSettings().file_roots == ()
    assert load_settings().fetch.file_roots == ()


def test_file_roots_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMOTION_WORKER_FETCH__FILE_ROOTS", '["/srv/frames"]')
    assert load_settings().fetch.file_roots == (Path("/srv/frames"),)


@pytest.mark.parametrize("root", ["/", "/etc", "/proc", "/home", "/etc/../"])
def test_check_warns_about_a_root_that_opens_system_folders(root: str) -> None:
    result = check_file_roots(settings("/srv/frames", root))
    assert result is not None and result.status == "WARN"
    line = format_result(result)
    assert line.startswith("WARN  file-roots") and "[fix: fetch.file_roots]" in line
    assert str(Path(root)) in line


@pytest.mark.parametrize("roots", [(), ("/srv/frames",), ("/var/lib/frames", "/home/cam/x")])
def test_check_says_nothing_about_narrow_roots(roots: tuple[str, ...]) -> None:
    assert check_file_roots(settings(*roots)) is None


def test_produce_warns_when_the_workers_would_refuse_its_file_events(tmp_path: Path) -> None:
    folder = tmp_path / "camera"
    folder.mkdir()
    problem = file_roots_problem(folder, settings())
    assert problem is not None
    assert "empty, the default" in problem and "--inline" in problem and str(folder) in problem
    other = file_roots_problem(folder, settings(tmp_path / "elsewhere"))
    assert other is not None and str(tmp_path / "elsewhere") in other
    assert file_roots_problem(folder, settings(tmp_path)) is None
    assert file_roots_problem(folder, settings(folder)) is None
