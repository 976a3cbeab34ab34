"""Chaos-soak fixtures, and the soak table printed at the end of the run.

The soak runs its own broker (it is killed, restarted and paused) and its own workers;
it does not use the session's broker. The table also goes to .cache/soak-report.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.soak.broker import ChaosBroker
from tests.soak.report import SOAK_REPORTS, SoakReport, write_markdown

REPORT_PATH = Path(__file__).resolve().parent.parent.parent / ".cache" / "soak-report.md"


def pytest_configure(config: pytest.Config) -> None:
    # Registered here rather than in pyproject.toml, whose hash names the .venv stamp.
    config.addinivalue_line(
        "markers", "soak: the chaos soak: minutes of random faults on its own broker and workers"
    )


@pytest.fixture
def chaos_broker(tmp_path: Path) -> Iterator[ChaosBroker]:
    """A broker of this run's own, with its data kept across the restarts it goes through."""
    broker = ChaosBroker(tmp_path / "kafka")
    broker.start()
    yield broker
    broker.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not SOAK_REPORTS:
        return
    terminalreporter.section("chaos soak")
    terminalreporter.write_line(SoakReport.table(SOAK_REPORTS))
    terminalreporter.write_line("")
    for report in SOAK_REPORTS:
        terminalreporter.write_line(report.details())
    write_markdown(SOAK_REPORTS, REPORT_PATH)
    terminalreporter.write_line(f"(also in {REPORT_PATH})")
