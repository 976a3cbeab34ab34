"""A real S3 endpoint for tests: moto's server as a subprocess on 127.0.0.1.

moto keeps everything in memory and needs no network. It accepts any credentials until
``require_auth()`` switches on its IAM checks, which is how tests get real
InvalidAccessKeyId, SignatureDoesNotMatch and AccessDenied answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import boto3
from botocore.config import Config

HOST = "127.0.0.1"  # never any other address
REGION = "us-east-1"
# moto's "root" credentials: any pair works until require_auth().
DUMMY_KEY_ID = "testing"
DUMMY_SECRET = "testing"
# urllib without the environment's proxies: the server is on loopback.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class S3Server:
    """``with S3Server() as s3:`` a moto server; ``s3.endpoint_url`` is where it listens."""

    def __init__(self, log_path: Path | None = None, start_timeout_s: float = 20.0) -> None:
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> S3Server:
        # The port is free when picked but might be taken before moto binds it: try again.
        for _ in range(3):
            self.port = free_port()
            self._start()
            if self._wait_until_up():
                return self
            self._stop()
        raise RuntimeError(f"moto server did not start on {HOST}:{self.port}")

    def __exit__(self, *exc: object) -> None:
        self._stop()

    def _start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
        env.update(
            AWS_ACCESS_KEY_ID=DUMMY_KEY_ID,
            AWS_SECRET_ACCESS_KEY=DUMMY_SECRET,
            AWS_DEFAULT_REGION=REGION,
            AWS_EC2_METADATA_DISABLED="true",
            PYTHONUNBUFFERED="1",
        )
        self._log = self.log_path.open("ab") if self.log_path else None
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def _wait_until_up(self) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                return False  # exited: most likely the port was taken
            try:
                with _DIRECT.open(f"{self.endpoint_url}/moto-api/", timeout=1):
                    return True
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        return False

    def _stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def client(self, service: str = "s3", **credentials: str) -> Any:
        """A boto3 client of this server (dummy credentials unless given; no proxies)."""
        return boto3.session.Session().client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=credentials.get("key_id", DUMMY_KEY_ID),
            aws_secret_access_key=credentials.get("secret", DUMMY_SECRET),
            config=Config(proxies={}, s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def create_user(self, name: str, *, may_read: str | None = None) -> tuple[str, str]:
        """An IAM user's (access key id, secret); `may_read` is a bucket it may GetObject from."""
        iam = self.client("iam")
        iam.create_user(UserName=name)
        if may_read is not None:
            policy = {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Action": "s3:GetObject",
                        "Resource": f"arn:aws:s3:::{may_read}/*",
                    }
                ],
            }
            iam.put_user_policy(UserName=name, PolicyName="read", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return str(key["AccessKeyId"]), str(key["SecretAccessKey"])

    @contextlib.contextmanager
    def require_auth(self) -> Iterator[None]:
        """Within: every request must be signed by a known IAM key allowed to do it."""
        self._set_auth(b"0")
        try:
            yield
        finally:
            self._set_auth(b"inf")

    def _set_auth(self, free_requests: bytes) -> None:
        """How many more requests moto serves without checking credentials."""
        request = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth",
            data=free_requests,
            method="POST",
            # Flask only exposes the raw body when it is not a form.
            headers={"Content-Type": "text/plain"},
        )
        with _DIRECT.open(request, timeout=10) as response:
            assert response.status == 200
