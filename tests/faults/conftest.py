"""Fault-suite fixtures, and the summary table printed at the end of the run.

The broker modules mark themselves (`pytestmark = pytest.mark.kafka`): a `pytestmark` in
a conftest.py marks nothing.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.checker import REPORTS, FaultReport, Stream
from tests.support.http_server import ImageServer


@pytest.fixture
def make_stream(
    kafka_bootstrap: str, topic_factory: Callable[..., str]
) -> Iterator[Callable[..., Stream]]:
    """make_stream(partitions=3, bootstrap=None) -> fresh input/output/dead-letter topics."""
    made: list[Stream] = []

    def make(partitions: int = 3, bootstrap: str | None = None) -> Stream:
        if bootstrap is None:
            frames = topic_factory("frames", partitions)
            out = topic_factory("emotions", partitions)
            dead = topic_factory("dead", 1)
        else:
            from consumer.stream.kafka_io import ensure_topics

            suffix = uuid.uuid4().hex[:8]
            frames, out, dead = (f"frames-{suffix}", f"emotions-{suffix}", f"dead-{suffix}")
            ensure_topics(bootstrap, [frames, out], partitions=partitions)
            ensure_topics(bootstrap, [dead], partitions=1)
        stream = Stream(
            bootstrap or kafka_bootstrap, frames, out, dead, partitions, group=f"group-{frames}"
        )
        made.append(stream)
        return stream

    yield make
    for stream in made:
        stream.close()


@pytest.fixture
def paced_images(tmp_path: Path, face_paths: list[Path]) -> Iterator[str]:
    """A loopback image server (20 ms a request) over numbered faces: its base URL.

    With one fetch thread the worker then takes several seconds for a few hundred events,
    so faults land in the middle of a stream.
    """
    folder = tmp_path / "faces"
    folder.mkdir()
    for index, path in enumerate(face_paths):
        shutil.copy(path, folder / f"{index}.png")
    with ImageServer(folder, delay_s=0.02) as server:
        yield server.url


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORTS:
        return
    terminalreporter.section("fault suite")
    terminalreporter.write_line(FaultReport.header())
    for report in REPORTS:
        terminalreporter.write_line(report.row())
    target = Path(__file__).resolve().parent.parent.parent / ".cache" / "fault-report.md"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(FaultReport.header() + "\n" + "\n".join(r.row() for r in REPORTS) + "\n")
