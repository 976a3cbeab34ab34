"""A single-node Apache Kafka broker (KRaft) on loopback, for the demo, tests and development.

No Docker and no Kafka package are needed: Maven fetches Apache Kafka's broker jars from
Maven Central once into a cache folder, and the broker runs from them with the local JDK.

    python -m deploy.kafka.local_broker run --port 9092     # foreground, Ctrl-C stops it
    python -m deploy.kafka.local_broker fetch               # only download the jars

Standard library only, so it also works before the worker's dependencies are installed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType

HERE = Path(__file__).resolve().parent
POM = HERE / "pom.xml"
LOG4J_CONFIG = HERE / "log4j2.properties"
READY_LINE = "Kafka Server started"


class BrokerError(RuntimeError):
    """The local broker could not be fetched, formatted or started."""


def kafka_version() -> str:
    """The Kafka version pinned in pom.xml."""
    text = POM.read_text(encoding="utf-8")
    start = text.index("<kafka.version>") + len("<kafka.version>")
    return text[start : text.index("</kafka.version>", start)]


def default_cache_dir() -> Path:
    # Outside the checkout so fresh clones on the same machine (CI) reuse the jars.
    root = os.environ.get("EMOTION_WORKER_CACHE") or Path.home() / ".cache" / "emotion-worker"
    return Path(root) / f"kafka-{kafka_version()}"


def _require(tool: str, hint: str) -> str:
    found = shutil.which(tool)
    if not found:
        raise BrokerError(f"`{tool}` is not on PATH; {hint}")
    return found


def ensure_kafka_libs(cache_dir: Path | None = None) -> Path:
    """The folder of broker jars, fetched with Maven on first use."""
    libs = (cache_dir or default_cache_dir()) / "libs"
    if (libs / ".complete").exists():
        return libs
    mvn = _require("mvn", "install Maven (apt-get install maven) or start your own broker")
    _require("java", "install a JDK 17+ (apt-get install openjdk-17-jre-headless)")
    staging = Path(
        tempfile.mkdtemp(prefix="libs-", dir=libs.parent if libs.parent.exists() else None)
    )
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}",
        "-DincludeScope=runtime",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise BrokerError(
            f"Maven could not fetch Kafka {kafka_version()}:\n{proc.stdout}{proc.stderr}"
        )
    (staging / ".complete").write_text(kafka_version(), encoding="utf-8")
    libs.parent.mkdir(parents=True, exist_ok=True)
    try:
        staging.rename(libs)  # atomic: two concurrent fetches cannot leave a half folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (libs / ".complete").exists():
            raise
    return libs


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_properties(data_dir: Path, port: int, controller_port: int) -> str:
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(data_dir / "log"),
        "num.partitions": "1",
        "auto.create.topics.enable": "false",
        # One node: internal topics cannot have more replicas than that.
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "4",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "4",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Tests start and stop consumers often; waiting for more members only slows them.
        "group.initial.rebalance.delay.ms": "0",
        "log.flush.interval.messages": "9223372036854775807",
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


class LocalKafkaBroker:
    """Start with `with LocalKafkaBroker() as broker:`; `broker.bootstrap_servers` to connect."""

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        heap: str = "512m",
        cache_dir: Path | None = None,
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="kafka-"))
        self.port = port or free_port()
        self.controller_port = free_port()
        self.heap = heap
        self.cache_dir = cache_dir
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "broker.log"

    def _java(self, libs: Path, main: str, *args: str) -> list[str]:
        return [
            _require("java", "install a JDK 17+"),
            f"-Xmx{self.heap}",
            "-Xss1m",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "-cp",
            str(libs / "*"),
            main,
            *args,
        ]

    def start(self, timeout_s: float = 90.0) -> str:
        """Fetch if needed, format the log dir, start the broker and wait until it serves."""
        libs = ensure_kafka_libs(self.cache_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = self.data_dir / "server.properties"
        props.write_text(_server_properties(self.data_dir, self.port, self.controller_port))
        if not (self.data_dir / "log" / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            fmt = subprocess.run(
                # "--cluster-id=ID", not "-t ID": a base64 id may start with "-" and would
                # then be parsed as an option.
                self._java(
                    libs,
                    "kafka.tools.StorageTool",
                    "format",
                    f"--cluster-id={cluster_id}",
                    f"--config={props}",
                ),
                capture_output=True,
                text=True,
                check=False,
            )
            if fmt.returncode != 0:
                raise BrokerError(f"formatting {self.data_dir} failed:\n{fmt.stdout}{fmt.stderr}")
        log = self.log_path.open("ab")
        log_start = log.tell()  # a restart appends: only this run's lines say it is ready
        # A session of its own: Ctrl-C in the terminal must not kill the broker before the
        # worker has committed; stop() ends it deliberately.
        self._proc = subprocess.Popen(
            self._java(libs, "kafka.Kafka", str(props)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._wait_ready(timeout_s, log_start)
        return self.bootstrap_servers

    def _wait_ready(self, timeout_s: float, log_start: int) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"broker exited with {self._proc.returncode}:\n{self._log_tail()}"
                )
            with self.log_path.open("rb") as log:
                log.seek(log_start)
                started = READY_LINE.encode() in log.read()
            if started and self._port_open():
                return
            time.sleep(0.2)
        self.stop()
        raise BrokerError(f"broker not ready within {timeout_s:.0f}s:\n{self._log_tail()}")

    def _port_open(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
            return True
        return False

    def _log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0, keep_data: bool = False) -> None:
        """SIGTERM (the broker's controlled shutdown), then SIGKILL if it hangs.

        A broker made without a data_dir deletes its temporary one unless keep_data.
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._own_dir and not keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> LocalKafkaBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="download the broker jars into the cache and exit")
    run = sub.add_parser("run", help="run a broker in the foreground until Ctrl-C")
    run.add_argument("--port", type=int, default=9092)
    run.add_argument("--data-dir", type=Path, default=None, help="kept between runs if given")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(ensure_kafka_libs())
            return 0
        broker = LocalKafkaBroker(data_dir=args.data_dir, port=args.port)
        broker.start()
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Kafka {kafka_version()} ready on {broker.bootstrap_servers} (Ctrl-C stops it)")
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        signal.sigwait(stop_signals)
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
