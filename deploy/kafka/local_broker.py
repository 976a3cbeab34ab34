"""A single-node Apache Kafka broker (KRaft) on loopback, for the demo, tests and development.

No Docker and no Kafka package are needed: Maven fetches Apache Kafka's broker jars from
Maven Central once into a cache folder, and the broker runs from them with the local JDK.

    python -m deploy.kafka.local_broker run --port 9092     # foreground, Ctrl-C stops it
    python -m deploy.kafka.local_broker fetch               # only download the jars
    python -m deploy.kafka.local_broker run --sasl-user worker:s3cret --tls   # + secured listeners

Secured listeners (optional, for testing the worker's SASL and TLS settings) sit beside
the PLAINTEXT one, which stays for admin and test tooling:

* SASL: SASL_PLAINTEXT with SCRAM-SHA-512, SCRAM-SHA-256 and PLAIN. SCRAM users are
  created when the storage is formatted (`--add-scram`), PLAIN users in the listener's JAAS.
* TLS: SSL with a throw-away CA made in Python; the server certificate is for 127.0.0.1.
* MTLS: the same, but the client must show a certificate signed by that CA.

Standard library only, so it also works before the worker's dependencies are installed;
only the TLS files (`make_tls_files`) need the `cryptography` package, a test dependency.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
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


SCRAM_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256")
SASL_MECHANISMS = (*SCRAM_MECHANISMS, "PLAIN")
# Names and passwords go unescaped into StorageTool's `--add-scram` argument, a JAAS line and
# a properties file: no separators (",", "]", "=", ";", ":"), quotes, backslashes or spaces.
_CREDENTIAL = re.compile(r"[A-Za-z0-9._~!@#%^&*()+-]+")


@dataclass(frozen=True)
class SaslUser:
    """A user of the SASL listener, known to the broker for each of `mechanisms`."""

    name: str
    password: str
    mechanisms: tuple[str, ...] = SASL_MECHANISMS

    def __post_init__(self) -> None:
        for what, value in (("name", self.name), ("password", self.password)):
            if not _CREDENTIAL.fullmatch(value):
                raise ValueError(
                    f"SASL user {what} {value!r} must match {_CREDENTIAL.pattern} (the broker's "
                    "format tool and JAAS config cannot quote other characters)"
                )
        unknown = set(self.mechanisms) - set(SASL_MECHANISMS)
        if unknown or not self.mechanisms:
            raise ValueError(f"mechanisms must be some of {SASL_MECHANISMS}, not {self.mechanisms}")

    def __repr__(self) -> str:  # never print the password by accident
        return f"SaslUser(name={self.name!r}, password='***', mechanisms={self.mechanisms!r})"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the throw-away CA, the broker and a client (for mTLS)."""

    folder: Path
    client_key_password: str

    @property
    def ca(self) -> Path:
        """The CA certificate: the client's `ssl.ca.location`."""
        return self.folder / "ca.pem"

    @property
    def broker_keystore(self) -> Path:
        """The broker's key and certificate in one PEM file (ssl.keystore.type=PEM)."""
        return self.folder / "broker-keystore.pem"

    @property
    def client_cert(self) -> Path:
        """A client certificate signed by the CA: `ssl.certificate.location`."""
        return self.folder / "client.pem"

    @property
    def client_key(self) -> Path:
        """Its key, encrypted with client_key_password: `ssl.key.location`."""
        return self.folder / "client-key.pem"

    @property
    def other_ca(self) -> Path:
        """A CA that signed nothing the broker shows: a client trusting only it must fail."""
        return self.folder / "other-ca.pem"


def make_tls_files(folder: Path, days: int = 7) -> TlsFiles:
    """A CA, a broker certificate for 127.0.0.1 and a client certificate, all PEM (EC P-256).

    Made again only if missing, so a kept data dir keeps its CA. Needs the `cryptography`
    package (a test dependency), imported here so the rest of this module stays stdlib-only.
    """
    files = TlsFiles(folder, client_key_password="client-key-pass")
    if (folder / ".complete").exists():
        return files
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:
        raise BrokerError(
            "TLS listeners need the `cryptography` package: pip install cryptography "
            "(it is in the test extra)"
        ) from exc

    folder.mkdir(parents=True, exist_ok=True)
    curve = ec.SECP256R1()
    now = datetime.datetime.now(datetime.UTC)
    not_before = now - datetime.timedelta(minutes=5)  # some slack for clock skew
    not_after = now + datetime.timedelta(days=days)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def certificate(
        subject: x509.Name,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Name,
        issuer_key: ec.EllipticCurvePrivateKey,
        extensions: Sequence[tuple[x509.ExtensionType, bool]],
    ) -> bytes:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
            )
        )
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical)
        return builder.sign(issuer_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    ca_extensions = [(x509.BasicConstraints(ca=True, path_length=None), True), (ca_usage, True)]
    ca_name, ca_key = name("emotion-worker test ca"), ec.generate_private_key(curve)
    files.ca.write_bytes(certificate(ca_name, ca_key, ca_name, ca_key, ca_extensions))
    other_name, other_key = name("emotion-worker test other-ca"), ec.generate_private_key(curve)
    files.other_ca.write_bytes(
        certificate(other_name, other_key, other_name, other_key, ca_extensions)
    )

    broker_key = ec.generate_private_key(curve)
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    broker_cert = certificate(
        name("127.0.0.1"),
        broker_key,
        ca_name,
        ca_key,
        [
            (x509.SubjectAlternativeName([loopback]), False),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    # Kafka reads a PEM keystore as the (PKCS#8) key followed by the certificate chain.
    plain_key = broker_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(files.broker_keystore, plain_key + broker_cert)

    client_key = ec.generate_private_key(curve)
    files.client_cert.write_bytes(
        certificate(
            name("emotion-worker"),
            client_key,
            ca_name,
            ca_key,
            [(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)],
        )
    )
    # Encrypted PKCS#8 (PBES2: PBKDF2-HMAC-SHA256 and AES-256-CBC), which librdkafka opens
    # with ssl.key.password.
    _write_private(
        files.client_key,
        client_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(files.client_key_password.encode()),
        ),
    )
    (folder / ".complete").write_text("")
    return files


def _write_private(path: Path, data: bytes) -> None:
    """Write a file holding a private key, readable only by its owner."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _server_properties(
    data_dir: Path,
    port: int,
    controller_port: int,
    sasl_port: int | None = None,
    sasl_users: Sequence[SaslUser] = (),
    tls_ports: tuple[int, int] | None = None,
    tls: TlsFiles | None = None,
) -> str:
    listeners = {"PLAINTEXT": port, "CONTROLLER": controller_port}
    protocols = {"PLAINTEXT": "PLAINTEXT", "CONTROLLER": "PLAINTEXT"}
    secured: dict[str, str] = {}
    if sasl_port is not None:
        listeners["SASL"] = sasl_port
        protocols["SASL"] = "SASL_PLAINTEXT"
        mechanisms = [m for m in SASL_MECHANISMS if any(m in u.mechanisms for u in sasl_users)]
        secured["listener.name.sasl.sasl.enabled.mechanisms"] = ",".join(mechanisms)
        for mechanism in SCRAM_MECHANISMS:
            if mechanism in mechanisms:
                # The server side of SCRAM needs no credentials: it checks the stored ones.
                secured[f"listener.name.sasl.{mechanism.lower()}.sasl.jaas.config"] = (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                )
        plain = [u for u in sasl_users if "PLAIN" in u.mechanisms]
        if plain:
            users = " ".join(f'user_{u.name}="{u.password}"' for u in plain)
            secured["listener.name.sasl.plain.sasl.jaas.config"] = (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
            )
    if tls_ports is not None and tls is not None:
        listeners["TLS"], listeners["MTLS"] = tls_ports
        protocols["TLS"] = protocols["MTLS"] = "SSL"
        secured.update(
            {
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(tls.broker_keystore),
                "ssl.truststore.type": "PEM",
                "ssl.truststore.location": str(tls.ca),
                "listener.name.tls.ssl.client.auth": "none",
                "listener.name.mtls.ssl.client.auth": "required",
            }
        )
    advertised = {name: p for name, p in listeners.items() if name != "CONTROLLER"}
    settings = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": ",".join(f"{name}://127.0.0.1:{p}" for name, p in listeners.items()),
        "advertised.listeners": ",".join(
            f"{name}://127.0.0.1:{p}" for name, p in advertised.items()
        ),
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": ",".join(f"{n}:{p}" for n, p in protocols.items()),
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
        **secured,
    }
    return "".join(f"{key}={value}\n" for key, value in settings.items())


def _scram_arguments(users: Sequence[SaslUser]) -> list[str]:
    """StorageTool's `--add-scram` arguments: each SCRAM credential, stored at format time."""
    return [
        f"--add-scram={mechanism}=[name={user.name},password={user.password}]"
        for user in users
        for mechanism in user.mechanisms
        if mechanism in SCRAM_MECHANISMS
    ]


class LocalKafkaBroker:
    """Start with `with LocalKafkaBroker() as broker:`; `broker.bootstrap_servers` to connect.

    `sasl_users` adds a SASL_PLAINTEXT listener (`sasl_bootstrap_servers`) that knows those
    users; `tls=True` adds an SSL listener (`tls_bootstrap_servers`) and one that requires
    a client certificate (`mtls_bootstrap_servers`), with their PEM files in `tls_files`.
    The PLAINTEXT listener (`bootstrap_servers`) is always there, for admin and test tools.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        port: int | None = None,
        heap: str = "512m",
        cache_dir: Path | None = None,
        sasl_users: Sequence[SaslUser] = (),
        tls: bool = False,
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="kafka-"))
        self.port = port or free_port()
        self.controller_port = free_port()
        self.heap = heap
        self.cache_dir = cache_dir
        self.sasl_users = tuple(sasl_users)
        self.sasl_port = free_port() if self.sasl_users else None
        self.tls_ports = (free_port(), free_port()) if tls else None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap_servers(self) -> str:
        """The SASL_PLAINTEXT listener (SCRAM-SHA-512, SCRAM-SHA-256, PLAIN)."""
        if self.sasl_port is None:
            raise BrokerError("this broker has no SASL listener: pass sasl_users")
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def tls_bootstrap_servers(self) -> str:
        """The SSL listener; clients need ssl.ca.location=tls_files.ca."""
        return f"127.0.0.1:{self._tls()[0]}"

    @property
    def mtls_bootstrap_servers(self) -> str:
        """The SSL listener that also requires a client certificate signed by the CA."""
        return f"127.0.0.1:{self._tls()[1]}"

    @property
    def tls_files(self) -> TlsFiles:
        self._tls()
        return make_tls_files(self.data_dir / "tls")

    def _tls(self) -> tuple[int, int]:
        if self.tls_ports is None:
            raise BrokerError("this broker has no TLS listeners: pass tls=True")
        return self.tls_ports

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
        props.write_text(
            _server_properties(
                self.data_dir,
                self.port,
                self.controller_port,
                self.sasl_port,
                self.sasl_users,
                self.tls_ports,
                self.tls_files if self.tls_ports else None,
            )
        )
        props.chmod(0o600)  # PLAIN users' passwords are in it
        if not (self.data_dir / "log" / "meta.properties").exists():
            # SCRAM users exist from the first start on; a kept data dir keeps its users.
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
                    *_scram_arguments(self.sasl_users),
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
        ports = [self.port, *([self.sasl_port] if self.sasl_port else []), *(self.tls_ports or ())]
        for port in ports:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
            except OSError:
                return False
        return True

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
    run.add_argument(
        "--sasl-user",
        action="append",
        default=[],
        metavar="NAME:PASSWORD",
        help="add a SASL_PLAINTEXT listener with this SCRAM-SHA-512/256 and PLAIN user "
        "(repeatable; SCRAM users are stored when a data dir is first formatted)",
    )
    run.add_argument("--tls", action="store_true", help="add TLS and mTLS listeners (own CA)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(ensure_kafka_libs())
            return 0
        users = []
        for spec in args.sasl_user:
            name, sep, password = spec.partition(":")
            if not sep:
                parser.error(f"--sasl-user {name!r}: expected NAME:PASSWORD")
            users.append(SaslUser(name, password))
        broker = LocalKafkaBroker(
            data_dir=args.data_dir, port=args.port, sasl_users=users, tls=args.tls
        )
        broker.start()
    except (BrokerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Kafka {kafka_version()} ready on {broker.bootstrap_servers} (Ctrl-C stops it)")
    if users:
        print(f"  SASL_PLAINTEXT (SCRAM-SHA-512/256, PLAIN): {broker.sasl_bootstrap_servers}")
    if args.tls:
        files = broker.tls_files
        print(f"  SSL: {broker.tls_bootstrap_servers} (ssl.ca.location={files.ca})")
        print(
            f"  SSL + client certificate: {broker.mtls_bootstrap_servers} "
            f"(ssl.certificate.location={files.client_cert}, "
            f"ssl.key.location={files.client_key}, "
            f"ssl.key.password={files.client_key_password} - a throw-away test key)"
        )
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        signal.sigwait(stop_signals)
    finally:
        broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
