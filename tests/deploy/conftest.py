"""Fixtures of the deployment tests: the rendered overlays, the CRD schemas and promtool.

Rendering, the CRDs and promtool need Go (deploy/manifests.py); without it these tests fail
with a message saying what to install, they are not skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy import manifests

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"


def _render(folder: Path) -> list[dict[str, Any]]:
    try:
        text = manifests.render(folder)
    except manifests.ToolMissingError as exc:
        pytest.fail(str(exc), pytrace=False)
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every overlay (and the base, as "base") rendered by kustomize: name -> objects."""
    out = {name: _render(K8S / "overlays" / name) for name in manifests.overlay_names()}
    out["base"] = _render(K8S / "base")
    return out


@pytest.fixture(scope="session")
def crds() -> dict[tuple[str, str], dict[str, Any]]:
    """(group, kind) -> the CustomResourceDefinition, from the projects' Go modules."""
    out = {}
    for group, kind in manifests.CRDS:
        try:
            path = manifests.crd_file(group, kind)
        except manifests.ToolMissingError as exc:
            pytest.fail(str(exc), pytrace=False)
        out[(group, kind)] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return out


@pytest.fixture(scope="session")
def promtool() -> Path:
    """promtool, built from Prometheus's Go module on first use (deploy/manifests.py)."""
    try:
        return manifests.promtool_binary()
    except manifests.ToolMissingError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def keda_kafka_scaler() -> str:
    try:
        return manifests.keda_kafka_scaler_source()
    except manifests.ToolMissingError as exc:
        pytest.fail(str(exc), pytrace=False)
