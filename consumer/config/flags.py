"""Command-line flags as settings overrides: one mapping per command, one way to apply it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Flag (argparse dest) -> (section, field) of WorkerSettings.
FlagMap = Mapping[str, tuple[str, str]]


def flag_overrides(args: object, flags: FlagMap) -> dict[str, Any]:
    """The nested settings dict of the flags that were given (None: not given), for
    load_settings: flags beat the environment and the config file."""
    nested: dict[str, dict[str, Any]] = {}
    for flag, (section, field) in flags.items():
        value = getattr(args, flag, None)
        if value is not None:
            nested.setdefault(section, {})[field] = value
    return nested
