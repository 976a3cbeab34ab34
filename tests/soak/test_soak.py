"""Chaos soak: several real workers on a real broker, random faults for minutes, then a
check of every input offset (issue 15, "Chaos soak" and "Memory under load").

A producer publishes good events, hostile events and slow images at a steady rate; a
controller (controller.py) injects random faults: SIGKILL and SIGTERM of workers, workers
joining and leaving, the broker killed and restarted, the broker paused longer than the
session timeout, a slow image server, decoder crashes. Afterwards everything is healed,
the workers drain and stop, and the output and dead-letter topics are read
(read_committed) and accounted for offset by offset (report.py, on the fault suite's
`tally`). Both processing guarantees.

CI runs SOAK_MINUTES=2 (the default) with a fixed seed (15); `make soak MINUTES=30` the
long one. SOAK_SEED=<n> replays a seed's faults (timing still differs run to run; "random"
draws one), SOAK_RATE the events a second (12), SOAK_WORKER_MODULE the module the workers
run (a wrapper with a candidate fix). Every run keeps its workers' and broker's logs, the
commit readings and the RSS samples in .cache/soak-logs/<mode>-<time>-seed<n>/.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path

import pytest

from consumer.stream.kafka_io import ensure_topics
from tests.faults.checker import Outcome
from tests.soak.broker import ChaosBroker
from tests.soak.commits import CommitWatch
from tests.soak.controller import KINDS, Controller
from tests.soak.load import LoadProducer, hostile_events
from tests.soak.report import SoakReport, account
from tests.soak.rss import RssSampler
from tests.soak.workers import KEPT, WorkerPool
from tests.support.http_server import ImageServer
from tests.support.kafka import TopicReader
from tests.support.worker import WorkerProcess

pytestmark = [pytest.mark.kafka, pytest.mark.soak]

REPO = Path(__file__).resolve().parent.parent.parent
LOGS = REPO / ".cache" / "soak-logs"
MINUTES = float(os.environ.get("SOAK_MINUTES") or 2)
_seed = os.environ.get("SOAK_SEED") or "15"
SEED = random.randrange(1_000_000) if _seed == "random" else int(_seed)
RATE_PER_S = float(os.environ.get("SOAK_RATE") or 12)
# The module the workers run (`python -m`): a wrapper to try a candidate fix against the soak.
WORKER_MODULE = os.environ.get("SOAK_WORKER_MODULE") or "tests.soak.soak_worker"
PARTITIONS = 6
SLOTS = 4  # at most this many workers at once
FIRST_WORKERS = 3
SESSION_TIMEOUT_MS = 6000  # the broker's minimum (group.min.session.timeout.ms)
DRAIN_TIMEOUT_S = 300.0


def _worker_settings(
    mode: str, bootstrap: str, topics: dict[str, str], group: str, model: Path, files: Path
) -> dict[str, str]:
    return {
        "kafka__bootstrap_servers": bootstrap,
        "kafka__input_topic": topics["input"],
        "kafka__output_topic": topics["output"],
        "kafka__dead_letter_topic": topics["dead"],
        "kafka__group_id": group,
        "kafka__processing_guarantee": mode,
        "kafka__commit_interval_s": "0.5",
        "kafka__consumer_config": json.dumps(
            {"session.timeout.ms": SESSION_TIMEOUT_MS, "heartbeat.interval.ms": 2000}
        ),
        "model__path": str(model),
        # debug: each result's line too, to tell which worker produced a duplicate
        "log__level": "debug",
        # The image server listens on loopback, which the SSRF guard refuses by default.
        "fetch__allow_hosts": '["127.0.0.1"]',
        "fetch__file_roots": json.dumps([str(REPO / "data"), str(files)]),
        "fetch__threads": "4",
        "fetch__timeout_s": "8",
        "fetch__retries": "1",
        "fetch__retry_backoff_s": "0.1",
        "decode__workers": "1",
        "decode__timeout_s": "5",
        "batch__max_batch_size": "8",
        "batch__max_wait_ms": "20",
        "flow__max_in_flight": "64",
        "flow__resume_below": "32",
        "health__host": "127.0.0.1",
        "health__port": "0",
        # /livez fails when the poll loop stalls this long (the pool probes it like a
        # kubelet); 60 s by default, shorter here to fit the short run. Longer than any
        # stall the worker allows itself (a commit waits up to 30 s for the broker).
        "health__loop_stall_s": "30",
    }


def _keep_logs(run: str, workers: list[Path], broker_log: Path, keep: int = 6) -> Path:
    """The workers' and the broker's logs, kept in .cache/soak-logs/<run>/ (the last few)."""
    target = LOGS / run
    target.mkdir(parents=True, exist_ok=True)
    for path in [*workers, broker_log]:
        if path.exists():
            shutil.copy(path, target / path.name)
    for old in sorted(LOGS.iterdir(), key=lambda p: p.stat().st_mtime)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _publishers(coords: set[tuple[int, int]], workers: list[WorkerProcess]) -> list[str]:
    """For input offsets (duplicates): which worker logs say they published an outcome."""
    found = []
    for worker in workers:
        for entry in worker.log_events():
            if entry.get("event") not in ("result published", "dead letter"):
                continue
            coord = (entry.get("partition"), entry.get("offset"))
            if coord in coords:
                found.append(
                    f"{coord[0]}@{coord[1]}: {entry['event']} by {worker.log_path.name} "
                    f"at {str(entry.get('timestamp'))[11:23]}"
                )
    return sorted(found)


def _read_outcomes(reader: TopicReader, output_topic: str, parsed: list[Outcome]) -> None:
    """Parse what the reader holds beyond `parsed` (results and dead letters, in order)."""
    for record in reader.records[len(parsed) :]:
        if record.topic == output_topic:
            parsed.append(Outcome.of_result(record))
        else:
            parsed.append(Outcome.of_dead_letter(record))


@pytest.mark.timeout(int(MINUTES * 60 + 1200))
@pytest.mark.parametrize("mode", ["at_least_once", "exactly_once"])
def test_chaos_soak(
    mode: str,
    chaos_broker: ChaosBroker,
    tiny_checkpoint: Path,
    face_paths: list[Path],
    tmp_path: Path,
) -> None:
    print(f"\nsoak: {mode}, {MINUTES:g} min of faults, seed {SEED} (SOAK_SEED={SEED} replays it)")
    bootstrap = chaos_broker.bootstrap_servers
    suffix = uuid.uuid4().hex[:8]
    topics = {k: f"soak-{k}-{suffix}" for k in ("input", "output", "dead")}
    ensure_topics(bootstrap, [topics["input"], topics["output"]], partitions=PARTITIONS)
    ensure_topics(bootstrap, [topics["dead"]], partitions=3)
    group = f"soak-{mode}-{suffix}"
    served = tmp_path / "served"
    served.mkdir()
    faces = face_paths[:56]
    for index, path in enumerate(faces):
        shutil.copy(path, served / f"{index}.png")
    files = tmp_path / "files"
    files.mkdir()
    settings = _worker_settings(mode, bootstrap, topics, group, tiny_checkpoint, files)
    started: list[WorkerProcess] = []

    def start(slot: int) -> WorkerProcess:
        extra = {}
        if mode == "exactly_once":
            # A stable identity per slot: static membership, and the transactional id that
            # fences the slot's killed predecessor.
            extra["kafka__group_instance_id"] = f"soak-worker-{slot}"
        log = tmp_path / f"worker-{slot}-{len(started)}.log"
        worker = WorkerProcess(log, {**settings, **extra}, WORKER_MODULE)
        started.append(worker)
        return worker

    pool = WorkerPool(start, slots=SLOTS)
    watch = CommitWatch(bootstrap, group, topics["input"], PARTITIONS)
    rss = RssSampler(lambda: pool.pid(KEPT))
    outcomes: list[Outcome] = []
    images = ImageServer(served).__enter__()
    load = LoadProducer(
        bootstrap,
        topics["input"],
        PARTITIONS,
        faces,
        images.url,
        hostile_events(faces[1], files, images.url),
        RATE_PER_S,
        seed=SEED + 1,
    )
    controller = Controller(
        random.Random(SEED),
        pool,
        chaos_broker,
        images,
        load,
        watch,
        session_timeout_s=SESSION_TIMEOUT_MS / 1000,
    )
    try:
        for slot in range(FIRST_WORKERS):
            pool.start(slot)
        pool.workers[KEPT].wait_for_log("partitions assigned", timeout_s=180)
        pool.probe.start()
        load.start()
        watch.start()
        rss.start()
        try:
            controller.run(MINUTES * 60)
        finally:
            controller.heal()
        load.stop()
        print(f"soak: faults over, {load.published} events published; draining", flush=True)

        # Drain: every published offset gets an outcome, with the pool still supervised.
        wanted = set(load.records)
        covered: set[tuple[int, int]] = set()
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        with TopicReader(bootstrap, [topics["output"], topics["dead"]]) as reader:
            while time.monotonic() < deadline and not wanted <= covered:
                reader.poll(0.5)
                known = len(outcomes)
                _read_outcomes(reader, topics["output"], outcomes)
                covered.update(o.coord for o in outcomes[known:])
                pool.supervise()
            if not wanted <= covered:
                behind = sorted(wanted - {o.coord for o in outcomes})
                print(f"soak: drain timed out, {len(behind)} without outcome: {behind[:20]}")
                print(f"soak: last commit reading {watch.read()}")
            rss.stop()
            codes = pool.stop_all()
            reader.catch_up()
            _read_outcomes(reader, topics["output"], outcomes)
        final = watch.read()
    finally:
        load.stop(flush_timeout_s=10)
        pool.probe.stop()
        watch.stop()
        rss.stop()
        images.__exit__(None, None, None)
        for worker in started:
            if worker.running():
                worker.kill()
        run = f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}-seed{SEED}"
        logs = _keep_logs(run, [w.log_path for w in started], chaos_broker.broker.log_path)
        with (logs / "commits.jsonl").open("w") as out:  # the commit readings, for a look later
            for reading in watch.readings:
                out.write(json.dumps(dataclasses.asdict(reading)) + "\n")
        rss.write_csv(logs / "rss.csv")
        (logs / "faults.txt").write_text(
            "".join(f"{i.at_s:7.1f} s {i.kind}: {i.detail}\n" for i in controller.injected)
        )
        print(f"soak: worker and broker logs, commit readings in {logs}")

    ends = final.ends if final else {}
    committed_at_end = final is not None and {
        p: max(o, 0) for p, o in final.committed.items()
    } == dict(ends)
    report = account(
        mode=mode,
        minutes=MINUTES,
        seed=SEED,
        input_topic=topics["input"],
        published=load.records,
        outcomes=outcomes,
        faults=watch.faults(),
        timeline=controller.injected,
        exits=pool.exits,
        stalls=watch.stalls(),
        regressions=watch.regressions,
        rss=rss,
        committed_at_end=committed_at_end,
        publish_errors=load.errors,
        watch_failures=watch.failures,
    )
    if report.duplicate_lines:
        twice = {c for c, n in collections.Counter(o.coord for o in outcomes).items() if n > 1}
        report.duplicate_sources = _publishers(twice, started)
    print("\n" + SoakReport.table([report]) + "\n\n" + report.details())
    failed = _violations(mode, report, load, watch, codes, committed_at_end)
    problems = "\n".join(f"  {p}" for p in report.problems[:40])
    assert not failed, "\n".join(failed) + (f"\nproblems:\n{problems}" if problems else "")


def _violations(
    mode: str,
    report: SoakReport,
    load: LoadProducer,
    watch: CommitWatch,
    codes: dict[int, int | None],
    committed_at_end: bool,
) -> list[str]:
    """Every check of the soak that failed, most important first (all are reported)."""
    t = report.tally
    checks = [
        (not load.errors, f"publishing failed: {load.errors[:3]}"),
        (t.produced >= RATE_PER_S * MINUTES * 60 / 2, f"only {t.produced} events published"),
        (t.missing == 0, f"{t.missing} events lost (no result, no dead letter)"),
        (t.wrong_event == 0, f"{t.wrong_event} outcomes name another event"),
        (t.unsent == 0, f"{t.unsent} outcomes for offsets never produced"),
        (t.misrouted == 0, f"{t.misrouted} good events dead-lettered or poison with a result"),
        (t.dup_below_commit == 0, f"{t.dup_below_commit} outcomes again below a commit"),
        (report.wrong_kind == 0, f"{report.wrong_kind} dead letters of an unexpected kind"),
        (not watch.regressions, f"commits moved back: {watch.regressions[:3]}"),
        (t.order_violations == 0, f"{t.order_violations} results out of per-stream order"),
        (
            mode != "exactly_once" or t.duplicates == 0,
            f"{t.duplicates} duplicates in exactly_once mode: {report.duplicate_lines[:10]}",
        ),
        (committed_at_end, "the group's commits are not the input's end offsets at the end"),
        (not report.hung, f"workers that did not stop on SIGTERM: {report.hung}"),
        (all(c == 0 for c in codes.values()), f"exit codes of the last stop: {codes}"),
        (
            MINUTES < 2 or set(KINDS) <= set(report.faults),
            f"fault kinds never injected: {sorted(set(KINDS) - set(report.faults))}",
        ),
    ]
    return [message for ok, message in checks if not ok]
