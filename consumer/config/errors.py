"""How a mistake in the settings is reported: ConfigError, and validation errors turned
into one line per problem with secrets masked."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class ConfigError(ValueError):
    """A setting a user gave is wrong; the message names the field and the fix."""


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem: the dotted field, what was wrong and what was given."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "(root)"
        given = err.get("input")
        # Error messages end up in logs: never echo a secret that was given.
        secret = any(_is_secret(str(part)) for part in err["loc"])
        shown = "'***'" if secret else repr(_redact(given))
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"{source} {field}: {err['msg']} (got {shown})")
    return "; ".join(lines)


_SECRET_WORDS = ("secret", "password", "token", "access_key", "credential", "sasl.")


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def _redact(value: Any) -> Any:
    """`value` with the values of secret-looking keys (at any depth) masked."""
    if isinstance(value, dict):
        return {k: "***" if _is_secret(str(k)) else _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value
