"""The multi-process supervisor: device resolution, what each child gets, and its signals.

Signal forwarding and child deaths are tested with a real supervisor process and real
small child programs (no model, no broker): the behaviour under test is process-level.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from consumer.cli import build_parser, overrides_from_flags
from consumer.config import (
    ConfigError,
    HealthSettings,
    KafkaSettings,
    ProcessSettings,
    WorkerSettings,
    load_settings,
)
from consumer.ops.child_spec import ChildSpec, child_env, child_specs
from consumer.ops.logs import PROCESS_INDEX_ENV
from consumer.ops.placement import Placement, parse_cuda_visible_devices, resolve_devices

REPO = Path(__file__).resolve().parent.parent.parent
TWO_CPUS = ProcessSettings(devices=("cpu", "cpu"))


def _no_gpu() -> int:
    return 0


# ---- devices ----------------------------------------------------------------------------


def test_auto_starts_one_cuda_process_per_visible_gpu() -> None:
    placements = resolve_devices("auto", {"CUDA_VISIBLE_DEVICES": "0,1"}, _no_gpu)
    assert placements == [
        Placement(0, "cuda:0", "cuda", "0"),
        Placement(1, "cuda:1", "cuda", "1"),
    ]
    # Children are pinned to the physical GPUs the supervisor was given, not to 0 and 1.
    assert [
        p.cuda_visible_devices for p in resolve_devices("auto", {"CUDA_VISIBLE_DEVICES": "2,3"})
    ] == ["2", "3"]


def test_auto_counts_the_gpus_when_cuda_visible_devices_is_unset() -> None:
    placements = resolve_devices("auto", {}, lambda: 3)
    assert [(p.device, p.cuda_visible_devices) for p in placements] == [
        ("cuda:0", "0"),
        ("cuda:1", "1"),
        ("cuda:2", "2"),
    ]


@pytest.mark.parametrize(
    "environ", [{}, {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"}]
)
def test_auto_without_a_gpu_is_an_error_naming_the_setting(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"processes\.devices=auto found no CUDA GPU.*'single'"):
        resolve_devices("auto", environ, _no_gpu)


def test_listed_devices_map_to_the_visible_gpus() -> None:
    placements = resolve_devices(("cpu", "cuda:1", "cuda:0"), {"CUDA_VISIBLE_DEVICES": "4,5"})
    assert placements == [
        Placement(0, "cpu", "cpu", ""),
        Placement(1, "cuda:1", "cuda", "5"),
        Placement(2, "cuda:0", "cuda", "4"),
    ]
    assert resolve_devices(("cuda:3",), {})[0].cuda_visible_devices == "3"
    with pytest.raises(ConfigError, match=r"'cuda:2'.*2 GPU\(s\)"):
        resolve_devices(("cuda:2",), {"CUDA_VISIBLE_DEVICES": "4,5"})


@pytest.mark.parametrize(
    ("value", "entries"),
    [
        ("0,1", ["0", "1"]),
        (" 1 , 2 ", ["1", "2"]),
        ("GPU-8f1c,MIG-2a", ["GPU-8f1c", "MIG-2a"]),
        ("0,-1,2", ["0"]),  # CUDA stops at the first invalid entry
        ("", []),
    ],
)
def test_parse_cuda_visible_devices(value: str, entries: list[str]) -> None:
    assert parse_cuda_visible_devices(value) == entries


# ---- what each child gets -----------------------------------------------------------------


def test_each_child_gets_its_port_instance_id_and_device() -> None:
    settings = WorkerSettings(
        health=HealthSettings(port=9100),
        kafka=KafkaSettings(group_instance_id="pod-a"),
        processes=ProcessSettings(devices=("cuda:0", "cpu")),
    )
    base = {"PATH": "/bin", "emotion_worker_model__device": "cpu"}  # any spelling is replaced
    envs = [
        child_env(settings, placement, base_env=base)
        for placement in resolve_devices(settings.processes.devices, {})
    ]
    for index, env in enumerate(envs):
        assert env["PATH"] == "/bin"
        assert env["EMOTION_WORKER_PROCESSES__DEVICES"] == "single"
        assert env["EMOTION_WORKER_HEALTH__PORT"] == str(9100 + index)
        assert env["EMOTION_WORKER_KAFKA__GROUP_INSTANCE_ID"] == f"pod-a-{index}"
        assert env[PROCESS_INDEX_ENV] == str(index)
        assert "emotion_worker_model__device" not in env
    assert (envs[0]["EMOTION_WORKER_MODEL__DEVICE"], envs[0]["CUDA_VISIBLE_DEVICES"]) == (
        "cuda",
        "0",
    )
    assert (envs[1]["EMOTION_WORKER_MODEL__DEVICE"], envs[1]["CUDA_VISIBLE_DEVICES"]) == ("cpu", "")


def test_port_zero_stays_zero_and_no_instance_id_is_invented() -> None:
    settings = WorkerSettings(health=HealthSettings(port=0), processes=TWO_CPUS)
    for placement in resolve_devices(settings.processes.devices, {}):
        env = child_env(settings, placement, base_env={})
        assert env["EMOTION_WORKER_HEALTH__PORT"] == "0"
        assert "EMOTION_WORKER_KAFKA__GROUP_INSTANCE_ID" not in env


def test_a_port_past_65535_is_a_config_error() -> None:
    settings = WorkerSettings(health=HealthSettings(port=65535), processes=TWO_CPUS)
    with pytest.raises(ConfigError, match=r"health\.port"):
        child_specs(settings, None, environ={})


def test_children_keep_flags_and_file_but_take_their_device_from_processes_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --device flag would beat the child's environment: it must not reach the child."""
    config = tmp_path / "worker.toml"
    config.write_text(
        '[kafka]\ngroup_id = "from-file"\ninput_topic = "file-topic"\n'
        '[model]\ndevice = "cpu"\n[health]\nport = 9200\n'
        '[processes]\ndevices = ["cuda:0", "cuda:1"]\n'
    )
    argv = ["run", "--config", str(config), "--device", "cpu", "--bootstrap-servers", "flag:9092"]
    args = build_parser().parse_args(argv)
    environ = {"EMOTION_WORKER_KAFKA__INPUT_TOPIC": "env-topic", "CUDA_VISIBLE_DEVICES": "6,7"}
    _use_env(monkeypatch, environ)
    settings = load_settings(args.config, overrides_from_flags(args))
    specs = child_specs(settings, args.config, overrides_from_flags(args), environ=environ)

    assert len(specs) == 2
    for index, spec in enumerate(specs):
        assert spec.argv[1:] == ["-m", "consumer.cli", "run", "--config", str(config)]
        _use_env(monkeypatch, spec.env)
        child_args = build_parser().parse_args(spec.argv[3:])
        child = load_settings(child_args.config, overrides_from_flags(child_args))
        assert child.processes.devices == "single"  # the child is a worker
        assert child.model.device == "cuda"  # not the flag's nor the file's "cpu"
        assert spec.env["CUDA_VISIBLE_DEVICES"] == ["6", "7"][index]
        assert child.health.port == 9200 + index
        assert child.kafka.bootstrap_servers == "flag:9092"  # the flag, now by environment
        assert child.kafka.input_topic == "env-topic"  # environment beats the file
        assert child.kafka.group_id == "from-file"


def _use_env(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]) -> None:
    """Make the settings' view of the environment exactly the EMOTION_WORKER_ part of this."""
    for name in list(os.environ):
        if name.upper().startswith("EMOTION_WORKER_"):
            monkeypatch.delenv(name)
    for name, value in environ.items():
        if name.upper().startswith("EMOTION_WORKER_"):
            monkeypatch.setenv(name, value)


# ---- signals and child deaths, with real processes ----------------------------------------

# A stand-in worker: records the signals it gets, drains for FAKE_DRAIN_S after the first,
# exits at once on a second (like StopSignals), or exits by itself if FAKE_EXIT is set.
FAKE_CHILD = """
import os, pathlib, signal, sys, time
folder = pathlib.Path(os.environ["FAKE_DIR"])
index = os.environ["EMOTION_WORKER_PROCESS_INDEX"]
time.sleep(float(os.environ.get("FAKE_START_DELAY_S", "0")))
got = []
def on_signal(signum, frame):
    got.append(signum)
    (folder / f"{index}.signals").write_text(",".join(map(str, got)))
    if len(got) > 1:
        os._exit(128 + signum)
signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)
(folder / f"{index}.pid").write_text(str(os.getpid()))
if "FAKE_EXIT" in os.environ:
    time.sleep(0.2)
    sys.exit(int(os.environ["FAKE_EXIT"]))
while not got:
    time.sleep(0.01)
end = time.monotonic() + float(os.environ.get("FAKE_DRAIN_S", "0"))
while time.monotonic() < end:
    time.sleep(0.01)
"""

# Runs a Supervisor over the specs in a JSON file, so that it owns its signal handlers.
DRIVER = """
import json, sys
from consumer.config import LogSettings
from consumer.ops.child_spec import ChildSpec
from consumer.ops.logs import configure_logging, get_logger
from consumer.ops.placement import Placement
from consumer.ops.supervisor import Supervisor
raw = json.loads(open(sys.argv[1]).read())
specs = [ChildSpec(Placement(**s["placement"]), s["argv"], s["env"]) for s in raw["specs"]]
configure_logging(LogSettings(format="json"))
log = get_logger("test.supervisor")
sys.exit(Supervisor(specs, stop_timeout_s=raw["stop_timeout_s"], log=log, poll_s=0.02).run())
"""


class SupervisorRun:
    """A supervisor process over fake children, with helpers to watch them."""

    def __init__(
        self, folder: Path, child_envs: list[dict[str, str]], stop_timeout_s: float = 30.0
    ) -> None:
        self.folder = folder
        specs = []
        for index, extra in enumerate(child_envs):
            env = {**os.environ, "FAKE_DIR": str(folder), PROCESS_INDEX_ENV: str(index), **extra}
            specs.append(
                {
                    "placement": {
                        "index": index,
                        "device": "cpu",
                        "model_device": "cpu",
                        "cuda_visible_devices": "",
                    },
                    "argv": [sys.executable, "-c", FAKE_CHILD],
                    "env": env,
                }
            )
        spec_file = folder / "specs.json"
        spec_file.write_text(json.dumps({"specs": specs, "stop_timeout_s": stop_timeout_s}))
        self.log_path = folder / "supervisor.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", DRIVER, str(spec_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        self.count = len(child_envs)

    def child_pids(self, timeout_s: float = 20.0) -> list[int]:
        """Once every child has installed its handlers: their pids."""
        files = [self.folder / f"{i}.pid" for i in range(self.count)]
        _wait_for(lambda: all(f.exists() and f.read_text() for f in files), timeout_s, self)
        return [int(f.read_text()) for f in files]

    def signals(self, index: int) -> list[int]:
        path = self.folder / f"{index}.signals"
        return [int(s) for s in path.read_text().split(",")] if path.exists() else []

    def wait(self, timeout_s: float = 20.0) -> int:
        return self.proc.wait(timeout_s)

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == name:
                    found.append(entry)
        return found

    def close(self) -> None:
        """Kill whatever a failed test left running: the supervisor, then its children."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid_file in self.folder.glob("*.pid"):
            pid = int(pid_file.read_text() or 0)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _wait_for(condition: Callable[[], bool], timeout_s: float, run: SupervisorRun) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(run.log_path.read_text(errors="replace")[-3000:])
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    """Running (a zombie or a missing pid is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def supervise(tmp_path: Path) -> Any:
    runs: list[SupervisorRun] = []

    def start(child_envs: list[dict[str, str]], stop_timeout_s: float = 30.0) -> SupervisorRun:
        run = SupervisorRun(tmp_path, child_envs, stop_timeout_s)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_is_forwarded_and_the_children_drain(
    supervise: Callable[..., SupervisorRun], signum: int
) -> None:
    run = supervise([{"FAKE_DRAIN_S": "0.3"}, {"FAKE_DRAIN_S": "0.3"}])
    pids = run.child_pids()
    run.proc.send_signal(signum)
    assert run.wait() == 0
    assert [run.signals(0), run.signals(1)] == [[signum], [signum]]  # once each
    assert not any(_alive(pid) for pid in pids)
    assert sorted(e["index"] for e in run.events("worker process exited")) == [0, 1]
    assert run.events("supervisor exiting")[0]["code"] == 0


def test_a_second_signal_is_forwarded_again_and_ends_the_drain(
    supervise: Callable[..., SupervisorRun],
) -> None:
    run = supervise([{"FAKE_DRAIN_S": "60"}, {"FAKE_DRAIN_S": "60"}])
    pids = run.child_pids()
    run.proc.send_signal(signal.SIGTERM)
    _wait_for(lambda: bool(run.signals(0) and run.signals(1)), 10, run)
    started = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    assert run.wait() == 1  # the children were cut short
    assert time.monotonic() - started < 10
    assert [run.signals(0), run.signals(1)] == [[signal.SIGTERM, signal.SIGINT]] * 2
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.parametrize("death", ["killed", "exit-3"])
def test_a_dead_child_stops_the_others_and_fails_the_supervisor(
    supervise: Callable[..., SupervisorRun], death: str
) -> None:
    dying = {"FAKE_EXIT": "3"} if death == "exit-3" else {}
    run = supervise([{"FAKE_DRAIN_S": "0.2"}, dying])
    pids = run.child_pids()
    if death == "killed":
        os.kill(pids[1], signal.SIGKILL)
    assert run.wait() == 1
    assert run.signals(0) == [signal.SIGTERM]  # the survivor was asked to drain
    assert run.signals(1) == []
    assert not any(_alive(pid) for pid in pids)
    exits = {e["index"]: e for e in run.events("worker process exited")}
    assert exits[1]["code"] == (-signal.SIGKILL if death == "killed" else 3)
    assert exits[1]["unexpected"] is True and exits[0]["code"] == 0
    if death == "killed":
        assert exits[1]["signal"] == "SIGKILL"


def test_two_deaths_in_one_turn_ask_the_survivors_to_drain_only_once() -> None:
    """A second SIGTERM would make the survivors exit at once, skipping their drain.

    Both deaths must be seen in the same turn of the loop, which a live supervisor
    cannot be made to do on cue, so this drives one turn by hand on real processes.
    """
    from consumer.ops.supervisor import Supervisor, _Child

    class Log:
        def info(self, *_: object, **__: object) -> None: ...
        def error(self, *_: object, **__: object) -> None: ...

    placement = Placement(0, "cpu", "cpu", "")
    survivor = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = [subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]) for _ in range(2)]
    try:
        for proc in dead:
            proc.wait(20)
        supervisor = Supervisor([], stop_timeout_s=30, log=Log())
        supervisor._children = [
            _Child(ChildSpec(placement, [], {}), proc) for proc in [survivor, *dead]
        ]
        supervisor._reap()
        assert [c.code for c in supervisor._children] == [None, 3, 3]
        assert supervisor._requests == [signal.SIGTERM]
        supervisor._deliver()
        assert survivor.wait(20) == -signal.SIGTERM
        assert supervisor._children[0].signals_sent == 1
    finally:
        survivor.kill()
        survivor.wait(10)


def test_children_that_do_not_stop_in_time_are_killed(
    supervise: Callable[..., SupervisorRun],
) -> None:
    run = supervise([{"FAKE_DRAIN_S": "60"}], stop_timeout_s=0.5)
    pids = run.child_pids()
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 1
    assert not _alive(pids[0])
    assert run.events("worker process did not stop in time; killing it")


def test_a_child_stopped_before_its_handlers_exist_counts_as_clean(
    supervise: Callable[..., SupervisorRun],
) -> None:
    """A stop during a child's start-up (model loading) is not a failure."""
    run = supervise([{"FAKE_START_DELAY_S": "30"}])
    _wait_for(lambda: bool(run.events("worker process started")), 20, run)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == 0
    assert run.events("worker process exited")[0]["signal"] == "SIGTERM"


def test_children_get_sigterm_when_the_supervisor_is_killed(
    supervise: Callable[..., SupervisorRun],
) -> None:
    """No orphans: Linux's parent-death signal asks them to drain and exit."""
    run = supervise([{"FAKE_DRAIN_S": "0"}, {"FAKE_DRAIN_S": "0"}])
    pids = run.child_pids()
    run.proc.kill()
    run.wait()
    _wait_for(lambda: not any(_alive(pid) for pid in pids), 10, run)
    assert [run.signals(0), run.signals(1)] == [[signal.SIGTERM]] * 2


def test_child_specs_start_the_cli_for_each_device() -> None:
    settings = WorkerSettings(processes=TWO_CPUS)
    specs = child_specs(settings, Path("w.toml"), {"log": {"format": "json"}}, environ={})
    assert [spec.placement.index for spec in specs] == [0, 1]
    assert all(isinstance(spec, ChildSpec) for spec in specs)
    assert specs[0].argv == [sys.executable, "-m", "consumer.cli", "run", "--config", "w.toml"]
    assert specs[1].env["EMOTION_WORKER_LOG__FORMAT"] == "json"
