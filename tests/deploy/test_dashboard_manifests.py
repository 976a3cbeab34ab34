"""The live page's Kubernetes manifests (deploy/k8s/dashboard), rendered and checked offline.

Against the Kubernetes API schemas, then what the schemas cannot know: the page's effective
settings inside the pod (its own config loader fed with the rendered ConfigMap, the
container's env and args) are behind auth wherever they leave loopback, the token comes
only from a Secret, the probes reach /healthz on the page's port, the Service stays inside
the cluster and selects the page's pods only, and the pod runs locked down like the worker.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from consumer.cli import build_parser
from consumer.config import WorkerSettings, load_settings
from consumer.dashboard.auth import exposure_problem, is_loopback
from consumer.dashboard.command import dashboard_overrides
from deploy import manifests
from tests.deploy.dockerfile import parse_dockerfile

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "k8s" / "dashboard"
KUBERNETES_VERSIONS = ("1.32", kubernetes_validate.utils.latest_version())
TOKEN_ENV = "EMOTION_WORKER_DASHBOARD__AUTH_TOKEN"


def _render(folder: Path) -> list[dict[str, Any]]:
    try:
        text = manifests.render(folder)
    except manifests.ToolMissingError as exc:
        pytest.fail(str(exc), pytrace=False)
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def objs() -> list[dict[str, Any]]:
    return _render(DASHBOARD)


def _one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = _one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "dashboard"
    result: dict[str, Any] = container
    return result


def _env_value(var: dict[str, Any]) -> str:
    if "value" in var:
        return str(var["value"])
    ref = var["valueFrom"]["secretKeyRef"]
    return f"<secret {ref['name']}/{ref['key']}>"


@pytest.fixture
def settings(
    objs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> WorkerSettings:
    """The page's effective settings in the pod, by its own loader."""
    container = _container(objs)
    assert "command" not in container, "keep the image's ENTRYPOINT (tini, then emotion-worker)"
    args = build_parser().parse_args(container["args"])
    assert args.command == "dashboard", container["args"]
    config = None
    if args.config is not None:
        path = PurePosixPath(str(args.config))
        volumes = {
            v["name"]: v for v in _one(objs, "Deployment")["spec"]["template"]["spec"]["volumes"]
        }
        (mount,) = [
            m for m in container["volumeMounts"] if PurePosixPath(m["mountPath"]) == path.parent
        ]
        name = volumes[mount["name"]]["configMap"]["name"]
        (config_map,) = [
            m for m in objs if m["kind"] == "ConfigMap" and m["metadata"]["name"] == name
        ]
        config = tmp_path / path.name
        config.write_text(config_map["data"][path.name], encoding="utf-8")
    for variable in list(os.environ):
        if variable.upper().startswith("EMOTION_WORKER_"):
            monkeypatch.delenv(variable)
    for var in container.get("env", []):
        monkeypatch.setenv(var["name"], _env_value(var))
    return load_settings(config, dashboard_overrides(args))


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_objects_match_the_kubernetes_api_schema(objs: list[dict[str, Any]], version: str) -> None:
    assert {o["kind"] for o in objs} == {"ServiceAccount", "ConfigMap", "Deployment", "Service"}
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {path}: {exc.message}")


def test_the_page_is_behind_auth_wherever_it_leaves_loopback(
    objs: list[dict[str, Any]], settings: WorkerSettings
) -> None:
    page = settings.dashboard
    assert exposure_problem(page) is None, "the dashboard would refuse to start"
    if not is_loopback(page.host):
        assert page.auth_token is not None
        env = {v["name"]: v for v in _container(objs)["env"]}
        ref = env[TOKEN_ENV]["valueFrom"]["secretKeyRef"]
        assert ref.get("optional", False) is False, "a pod without the token must not start"
        assert page.auth_token.get_secret_value() == f"<secret {ref['name']}/{ref['key']}>"


def test_the_token_comes_only_from_a_secret(objs: list[dict[str, Any]]) -> None:
    assert not [o for o in objs if o["kind"] == "Secret"], "no Secret objects in the repository"
    for var in _container(objs).get("env", []):
        if any(word in var["name"].lower() for word in ("token", "password", "secret")):
            assert "secretKeyRef" in var.get("valueFrom", {}), var["name"]
    (config_map,) = [o for o in objs if o["kind"] == "ConfigMap"]
    for text in config_map["data"].values():
        for line in text.splitlines():
            code = line.split("#", 1)[0].lower()
            assert "token" not in code and "password" not in code, line


def test_probes_reach_the_health_path_on_the_pages_port(
    objs: list[dict[str, Any]], settings: WorkerSettings
) -> None:
    container = _container(objs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == settings.dashboard.port
    assert not is_loopback(settings.dashboard.host), "the kubelet probes the pod IP"
    for probe in ("readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] == "/healthz", probe  # the only path served without the token
        assert ports[http["port"]] == settings.dashboard.port, probe


def test_the_service_stays_in_the_cluster_and_selects_only_the_page(
    objs: list[dict[str, Any]],
) -> None:
    service = _one(objs, "Service")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert not [o for o in objs if o["kind"] == "Ingress"]
    deployment = _one(objs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    # The worker's Service and disruption budget must not pick up the page's pod.
    for obj in _render(REPO / "deploy" / "k8s" / "base"):
        if obj["kind"] in ("Service", "PodDisruptionBudget"):
            selector = obj["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert not selector.items() <= labels.items(), obj["metadata"]["name"]


def test_the_pod_runs_locked_down(objs: list[dict[str, Any]]) -> None:
    pod = _one(objs, "Deployment")["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    dockerfile = parse_dockerfile(REPO / "Dockerfile")
    final = dockerfile.in_stage(dockerfile.final_stage)
    user = [i.value for i in final if i.keyword == "USER"][-1]
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == user
    assert pod["automountServiceAccountToken"] is False
    account = _one(objs, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    context = _container(objs)["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    resources = _container(objs)["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (tmp,) = [m for m in _container(objs)["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "sizeLimit" in volumes[tmp["name"]]["emptyDir"]


def test_image_has_a_tag(objs: list[dict[str, Any]]) -> None:
    image = _container(objs)["image"]
    name, _, tag = image.rpartition(":")
    assert name and tag, image
