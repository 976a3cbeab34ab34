"""The configuration reference, docs/configuration.md, generated from the settings model.

    python -m consumer.config.reference > docs/configuration.md    (`make docs`)
    python -m consumer.config.reference --check    (exit 1 when the file is out of date)

Types, constraints, defaults and environment variable names come from the pydantic field
information of `WorkerSettings` and its sections (consumer/config/), the text from each
section's docstring and each field's `description`; nothing is written per field here.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic.fields import FieldInfo

from consumer.config.settings import WorkerSettings

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
COMMAND = "python -m consumer.config.reference > docs/configuration.md"

_ENV_PREFIX = str(WorkerSettings.model_config.get("env_prefix", ""))
_ENV_DELIMITER = str(WorkerSettings.model_config.get("env_nested_delimiter") or "__")

_TYPE_NAMES: dict[Any, str] = {
    str: "str",
    int: "int",
    float: "float",
    bool: "bool",
    Path: "path",
    SecretStr: "secret str",
    SecretBytes: "secret bytes",
}


def _intro() -> str:
    p, d = _ENV_PREFIX, _ENV_DELIMITER
    table = f"{p}KAFKA{d}COMMON_CONFIG"
    return f"""\
# Configuration reference

<!-- Generated from the settings model (consumer/config/) by
     `{COMMAND}` (`make docs`);
     do not edit by hand. -->

The worker's settings come from four sources: the flags of `emotion-worker run` (see
`emotion-worker run --help`), the environment, a TOML config file (`--config worker.toml`)
and the defaults below. Precedence: flags > environment > config file > defaults, **key by
key**: tables from the file, the environment and the flags are merged, so
`{table}='{{"sasl.password": "..."}}'`
joins the file's other `common_config` keys rather than replacing them (lists are replaced
whole).

In the config file each section below is a TOML table (`[kafka]`, `[fetch.s3]`), and
`kafka.group_id` is `group_id` in `[kafka]`. In the environment a setting is
`{p}<SECTION>{d}<FIELD>`, with `{d}` between levels
(`{p}FETCH{d}S3{d}REGION=eu-west-1`); tables and lists are JSON
(`{p}FETCH{d}ALLOW_HOSTS='["10.0.0.0/8"]'`), and one key of a table may also be
its own variable (`{table}{d}sasl.password=...`).

A mistake is reported with the field and the fix, and the process exits 2. The worker logs
its effective config at start-up with secrets masked.
"""


def sections() -> Iterator[tuple[str, type[BaseModel]]]:
    """(dotted name, model) of every settings section, nested ones after their parent."""

    def walk(prefix: str, model: type[BaseModel]) -> Iterator[tuple[str, type[BaseModel]]]:
        for name, field in model.model_fields.items():
            sub = _section_model(field)
            if sub is not None:
                dotted = f"{prefix}.{name}" if prefix else name
                yield dotted, sub
                yield from walk(dotted, sub)

    yield from walk("", WorkerSettings)


def settings() -> Iterator[tuple[str, FieldInfo]]:
    """(dotted name, field) of every setting (the leaves), in declaration order."""
    for dotted, model in sections():
        for name, field in model.model_fields.items():
            if _section_model(field) is None:
                yield f"{dotted}.{name}", field


def env_var(dotted: str) -> str:
    """The environment variable of a dotted setting name."""
    return _ENV_PREFIX + _ENV_DELIMITER.join(dotted.split(".")).upper()


def type_text(field: FieldInfo) -> str:
    """The field's type and constraints, for people: `int ≥ 1, ≤ 1024`, `one of: a, b`."""
    members = _union_members(field.annotation)
    optional = type(None) in members
    # A union with a choice in it reads better with the alternatives set apart.
    text = "; or ".join(_type_name(member) for member in members if member is not type(None))
    bounds, others = _constraints(field)
    if bounds:
        text = f"{text} {bounds}"
    if others:
        text = f"{text}, {others}"
    return f"optional {text}" if optional else text


def default_text(field: FieldInfo) -> str:
    """The default as JSON-ish text; `none` for None; secrets are never shown."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "none"
    return f"`{_json_ish(value)}`"


def render() -> str:
    """The whole Markdown document."""
    parts = [_intro()]
    for dotted, model in sections():
        parts.append(f"\n## `{dotted}`\n\n")
        doc = (model.__doc__ or "").strip()
        if doc:
            parts.append(f"{' '.join(doc.split())}\n\n")
        parts.append("| setting | type | default | environment variable | description |\n")
        parts.append("|---|---|---|---|---|\n")
        for name, field in model.model_fields.items():
            if _section_model(field) is not None:
                continue
            setting = f"{dotted}.{name}"
            cells = (
                f"`{setting}`",
                type_text(field),
                default_text(field),
                f"`{env_var(setting)}`",
                " ".join((field.description or "").split()),
            )
            parts.append("| " + " | ".join(_cell(c) for c in cells) + " |\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m consumer.config.reference", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 when {DOC_PATH.name} differs from what this command writes",
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        try:
            current = DOC_PATH.read_text(encoding="utf-8")
        except OSError as exc:
            current = None
            reason = f"cannot be read ({exc.strerror})"
        else:
            reason = "is out of date with the settings model (consumer/config/)"
        if current != text:
            print(f"docs/configuration.md {reason}; run `make docs` ({COMMAND})", file=sys.stderr)
            return 1
        return 0
    # UTF-8 whatever the locale: the document has ≥ and ≤ in it.
    sys.stdout.buffer.write(text.encode("utf-8"))
    sys.stdout.flush()
    return 0


def _section_model(field: FieldInfo) -> type[BaseModel] | None:
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _union_members(annotation: Any) -> tuple[Any, ...]:
    """The members of a union (`X | None` included), or the annotation alone."""
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _or(names: Iterable[str]) -> str:
    """`a`, `a or b`, `a, b or c`."""
    listed = list(names)
    return listed[0] if len(listed) == 1 else ", ".join(listed[:-1]) + " or " + listed[-1]


def _type_name(annotation: Any) -> str:
    members = _union_members(annotation)
    if len(members) > 1:
        return "; or ".join(_type_name(member) for member in members)
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Literal:
        return "one of: " + ", ".join(str(arg) for arg in args)
    if origin in (tuple, list, set, frozenset):
        items = {arg for arg in args if arg is not Ellipsis}
        return "list of " + (_type_name(items.pop()) if len(items) == 1 else "values")
    if origin is dict:
        key, value = args or (str, Any)
        value_names = _or(_type_name(member) for member in _union_members(value))
        return f"table of {_type_name(key)} to {value_names}"
    if annotation in _TYPE_NAMES:
        return _TYPE_NAMES[annotation]
    return str(getattr(annotation, "__name__", annotation))


def _constraints(field: FieldInfo) -> tuple[str, str]:
    """(bounds, other constraints) from the field's metadata (annotated_types, pattern)."""
    bounds: dict[str, str] = {}
    length: list[str] = []
    other: list[str] = []
    for item in field.metadata:
        for attr, sign, kind in (("gt", ">", "lower"), ("ge", "≥", "lower")):
            if getattr(item, attr, None) is not None:
                bounds[kind] = f"{sign} {getattr(item, attr)}"
        for attr, sign, kind in (("lt", "<", "upper"), ("le", "≤", "upper")):
            if getattr(item, attr, None) is not None:
                bounds[kind] = f"{sign} {getattr(item, attr)}"
        if getattr(item, "min_length", None) is not None:
            length.append(f"≥ {item.min_length}")
        if getattr(item, "max_length", None) is not None:
            length.append(f"≤ {item.max_length}")
        if getattr(item, "pattern", None) is not None:
            other.append(f"matching `{item.pattern}`")
    if length:
        other.insert(0, "length " + ", ".join(length))
    ordered = [bounds[kind] for kind in ("lower", "upper") if kind in bounds]
    return ", ".join(ordered), ", ".join(other)


def _json_ish(value: Any) -> str:
    if isinstance(value, SecretStr | SecretBytes):
        return "(secret)"
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="python")
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        simple = bool(value) and value == value.strip() and value.isprintable() and "`" not in value
        return value if simple else json.dumps(value, ensure_ascii=False)
    return json.dumps(_plain(value), ensure_ascii=False)


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr | SecretBytes):
        return "(secret)"
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


if __name__ == "__main__":
    sys.exit(main())
