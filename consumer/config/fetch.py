"""Fetching the images: the HTTP(S) client, its limits and SSRF allowances, and the S3 client."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from consumer.config.base import Section

# A DNS name: dot-separated labels of letters, digits and hyphens (a trailing dot is fine).
_HOSTNAME = re.compile(r"(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?)+")


class S3Settings(Section):
    """The S3 client that reads `s3://` image references."""

    # The endpoint is trusted configuration, so the SSRF policy for event URLs does not
    # apply to it.
    endpoint_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s/@]+(/.*)?$",
        description=(
            "URL of an S3-compatible server (MinIO, Ceph, GCS interoperability), e.g. "
            "`http://minio.storage:9000`; trusted, so not subject to the SSRF policy. "
            "None: AWS's own endpoint for the region."
        ),
    )
    region: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description=(
            "Region, e.g. `eu-west-1`. None: boto3's chain (`AWS_REGION` / "
            "`AWS_DEFAULT_REGION`, the profile, instance metadata)."
        ),
    )
    access_key_id: SecretStr | None = Field(
        default=None,
        description=(
            "Static access key id, set together with `fetch.s3.secret_access_key`. None "
            "(with the other two): boto3's credential chain: environment variables, a "
            "web-identity token (EKS IRSA), the ECS or EC2 role."
        ),
    )
    secret_access_key: SecretStr | None = Field(
        default=None,
        description="Static secret access key, set together with `fetch.s3.access_key_id`.",
    )
    session_token: SecretStr | None = Field(
        default=None,
        description="Session token of temporary credentials; needs `fetch.s3.access_key_id`.",
    )
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto",
        description=(
            "`path` (endpoint/bucket/key) is what most S3-compatible servers want; "
            "`virtual` (bucket.endpoint/key) is AWS's default; `auto` lets boto3 choose."
        ),
    )

    @model_validator(mode="after")
    def _check_keys(self) -> S3Settings:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError(
                "fetch.s3.access_key_id and fetch.s3.secret_access_key go together: "
                "set both, or neither to use the standard credential chain"
            )
        if self.session_token is not None and self.access_key_id is None:
            raise ValueError("fetch.s3.session_token needs fetch.s3.access_key_id too")
        return self


class FetchSettings(Section):
    """Fetching images: threads, timeouts, connection reuse, size caps, retries, access."""

    # Each fetch holds at most one connection, so the thread count also bounds the open
    # connections of the shared HTTP pool and the S3 client.
    threads: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Concurrent image fetches (threads); also bounds the open connections.",
    )
    timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description=(
            "Total budget of one fetch attempt, in seconds: connection, redirects and body."
        ),
    )
    connect_timeout_s: float = Field(
        default=3.0,
        gt=0,
        le=60,
        description="TCP (and TLS) connection set-up, per address tried, in seconds.",
    )
    read_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description=(
            "Longest silence while waiting for headers or body bytes, in seconds; a server "
            "that keeps trickling is still cut off by `fetch.timeout_s`."
        ),
    )
    pool_max_idle: int = Field(
        default=32,
        ge=0,
        le=1024,
        description="Idle keep-alive HTTP(S) connections kept for reuse, in all.",
    )
    pool_max_idle_per_host: int = Field(
        default=4,
        ge=0,
        le=256,
        description="Idle keep-alive HTTP(S) connections kept for reuse, per host.",
    )
    max_bytes: int = Field(
        default=20 * 1024 * 1024,
        ge=1024,
        description="Image size cap in bytes, enforced while reading (default 20 MiB).",
    )
    max_pixels: int = Field(
        default=40_000_000,
        ge=1,
        description="Decompression-bomb cap: most pixels an image may have.",
    )
    retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description=(
            "Extra tries of retriable failures (timeouts, connection errors, 5xx responses)."
        ),
    )
    retry_backoff_s: float = Field(
        default=0.2,
        ge=0,
        le=30,
        description="Wait before the first retry, in seconds; it doubles for each next one.",
    )
    # Redirects are followed by the worker itself, so that each hop is checked like the first
    # URL.
    max_redirects: int = Field(
        default=3,
        ge=0,
        le=20,
        description="Redirects followed, each checked like the first URL.",
    )
    allow_hosts: tuple[str, ...] = Field(
        default=(),
        description=(
            "http(s) fetches refuse hosts that resolve to loopback, private, link-local "
            "(cloud metadata), CGNAT, multicast or reserved addresses; entries here are "
            'trusted anyway: a hostname (`"images.internal"`), an address (`"127.0.0.1"`) '
            'or a network (`"10.0.0.0/8"`).'
        ),
    )
    # Empty by default: a file:// reference lets whoever publishes an event choose a file of
    # the worker's host (keys, tokens, /proc), so reading files is something to turn on.
    file_roots: tuple[Path, ...] = Field(
        default=(),
        description=(
            "Absolute folders that `file://` images must lie in (real path: symlinks and "
            "`..` resolved). Empty (the default): `file://` images are refused "
            '(`image_fetch_refused`); e.g. `["/srv/frames"]` to read that folder.'
        ),
    )
    max_data_uri_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        description=(
            "Decoded size cap of `data:` images in bytes (default 1 MiB); the event must "
            "also fit `flow.max_event_bytes`, so the effective cap is the smaller one."
        ),
    )
    s3: S3Settings = Field(
        default=S3Settings(), description="The S3 client for `s3://` images (`fetch.s3.*`)."
    )

    @field_validator("allow_hosts")
    @classmethod
    def _check_allow_hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip("[]"), strict=False)
            except ValueError:
                if not _HOSTNAME.fullmatch(entry):
                    raise ValueError(
                        f"fetch.allow_hosts entry {entry!r} is neither a hostname nor an "
                        "address or CIDR network (e.g. 'images.internal', '10.0.0.0/8')"
                    ) from None
        return value

    @field_validator("file_roots", mode="before")
    @classmethod
    def _refuse_null_file_roots(cls, value: object) -> object:
        # null used to mean "any path"; now it would silently mean "none", so it is an error
        # that says what to write instead.
        if value is None:
            raise ValueError(
                "fetch.file_roots no longer takes null (it meant any path): list the folders "
                'file:// images may be read from, e.g. ["/srv/frames"], or leave it out to '
                "refuse file:// images"
            )
        return value

    @field_validator("file_roots")
    @classmethod
    def _check_file_roots(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        for root in value:
            if not root.is_absolute():
                raise ValueError(f"fetch.file_roots entry {str(root)!r} must be absolute")
        return value
