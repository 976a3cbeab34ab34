"""Just enough of Docker's Dockerfile and .dockerignore rules to check ours without an engine."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    value: str  # the rest of the logical line, continuations joined
    line: int  # 1-based line of its first physical line
    stage: int  # index of the build stage it belongs to (-1: before the first FROM)

    def flags(self) -> dict[str, str]:
        """Leading --name=value flags (COPY --from=build, HEALTHCHECK --interval=30s)."""
        out = {}
        for token in shlex.split(self.value):
            if not token.startswith("--"):
                break
            name, _, value = token[2:].partition("=")
            out[name] = value
        return out

    def arguments(self) -> list[str]:
        """The arguments after the flags; a JSON array when the instruction uses exec form."""
        rest = self.value
        while rest.startswith("--"):
            rest = rest.split(None, 1)[1] if " " in rest else ""
        rest = rest.strip()
        if rest.startswith("["):
            parsed = json.loads(rest)
            assert isinstance(parsed, list), rest
            return [str(part) for part in parsed]
        return shlex.split(rest)

    def is_exec_form(self) -> bool:
        rest = self.value
        while rest.startswith("--"):
            rest = rest.split(None, 1)[1] if " " in rest else ""
        try:
            return isinstance(json.loads(rest.strip()), list)
        except json.JSONDecodeError:
            return False


@dataclass
class Dockerfile:
    instructions: list[Instruction]
    stage_names: list[str | None] = field(default_factory=list)

    @property
    def final_stage(self) -> int:
        return len(self.stage_names) - 1

    def in_stage(self, stage: int) -> list[Instruction]:
        return [i for i in self.instructions if i.stage == stage]

    def stage_index(self, name_or_index: str) -> int:
        if name_or_index.isdigit():
            return int(name_or_index)
        return self.stage_names.index(name_or_index)


def parse_dockerfile(path: Path) -> Dockerfile:
    """Logical instructions: comments dropped, backslash continuations joined."""
    instructions: list[Instruction] = []
    names: list[str | None] = []
    pending = ""
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue  # a comment inside a continued instruction does not end it
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = (pending + stripped).strip()
        pending = ""
        if not text:
            continue
        keyword, _, value = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.search(r"\s+AS\s+(\S+)\s*$", value, re.IGNORECASE)
            names.append(match.group(1) if match else None)
        instructions.append(Instruction(keyword, value.strip(), start, len(names) - 1))
    return Dockerfile(instructions, names)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's (Go filepath.Match plus **) pattern as a regular expression."""
    out = ""
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            continue
        if char == "*":
            out += "[^/]*"
        elif char == "?":
            out += "[^/]"
        else:
            out += re.escape(char)
        i += 1
    return re.compile(out + r"\Z")


@dataclass
class DockerIgnore:
    rules: list[tuple[bool, re.Pattern[str], str]]  # (exclude?, regex, original pattern)

    @classmethod
    def read(cls, path: Path) -> DockerIgnore:
        rules = []
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = line[1:].strip() if negated else line
            pattern = pattern.strip("/")
            pattern = re.sub(r"/+", "/", pattern)
            if pattern.startswith("./"):
                pattern = pattern[2:]
            rules.append((not negated, _pattern_regex(pattern), line))
        return cls(rules)

    def excluded(self, relative: str) -> bool:
        """Whether a path (relative to the context, "/"-separated) stays out of the context.

        As Docker does: the last rule that matches the path or one of its parent folders wins.
        """
        relative = relative.strip("/")
        parts = relative.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for exclude, regex, _ in self.rules:
            if any(regex.match(candidate) for candidate in candidates):
                result = exclude
        return result

    def may_include_below(self, folder: str) -> bool:
        """Whether a `!` rule could bring back some path below an excluded folder.

        Only a rule with more segments than the folder (or a `**`) can: one that matches
        the folder or a parent matches every path below it too, in the same order.
        """
        segments = folder.strip("/").split("/")
        for exclude, _, line in self.rules:
            if exclude:
                continue
            pattern = line[1:].strip().strip("/").split("/")
            if "**" not in pattern and len(pattern) <= len(segments):
                continue
            for pattern_segment, segment in zip(pattern, segments, strict=False):
                if pattern_segment == "**":
                    return True
                if not _pattern_regex(pattern_segment).match(segment):
                    break
            else:
                return True
        return False


def context_files(root: Path, ignore: DockerIgnore) -> list[str]:
    """Files `docker build` would send from root: every file .dockerignore does not exclude."""
    found = []
    stack = [root]
    while stack:
        folder = stack.pop()
        for entry in sorted(folder.iterdir()):
            relative = entry.relative_to(root).as_posix()
            if entry.is_dir() and not entry.is_symlink():
                if ignore.excluded(relative) and not ignore.may_include_below(relative):
                    continue
                stack.append(entry)
            elif not ignore.excluded(relative):
                found.append(relative)
    return sorted(found)
