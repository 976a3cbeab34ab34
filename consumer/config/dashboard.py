"""The live page, `emotion-worker dashboard`: where it listens, what it reads, who may see it."""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator

from consumer.config.base import Section

# Shorter tokens are guessable by anyone who can reach the port.
MIN_TOKEN_LENGTH = 16


class DashboardSettings(Section):
    """The live page of `emotion-worker dashboard`: the window summaries of the last minutes,
    per stream, read from the summaries topic. It listens on loopback unless `dashboard.host`
    says otherwise, and refuses any other address without `dashboard.auth_token`."""

    # The topic it reads is summarize.summaries_topic: one name for the writer and readers.
    host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description=(
            "Address the page is served on. A non-loopback address (`0.0.0.0`, a pod IP) "
            "needs `dashboard.auth_token`: the page shows how the people on camera feel."
        ),
    )
    port: int = Field(
        default=8080, ge=0, le=65535, description="Port of the page; 0: any free port (tests)."
    )
    history_minutes: float = Field(
        default=10.0,
        gt=0,
        le=1440,
        description=(
            "Minutes of summaries the page shows per stream (behind the stream's newest "
            "window); a page opened now starts with the summaries published this long ago."
        ),
    )
    max_streams: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description=(
            "Streams kept in memory and shown; beyond it the stream that was silent the "
            "longest is dropped."
        ),
    )
    auth_token: SecretStr | None = Field(
        default=None,
        description=(
            f"Token a client must send, at least {MIN_TOKEN_LENGTH} characters: as "
            "`Authorization: Bearer <token>`, or as the password of HTTP basic auth (any "
            "user name; the browser asks). None: no auth, allowed on loopback only. Give it "
            "through the environment or a Secret, not the config file."
        ),
    )

    @field_validator("auth_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"dashboard.auth_token must be at least {MIN_TOKEN_LENGTH} characters "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)"
            )
        return value
