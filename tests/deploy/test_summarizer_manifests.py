"""The summarizer's Kubernetes objects (deploy/k8s/base/summarizer-*.yaml) in every overlay.

What the schemas cannot know (the API schemas check it in test_manifests.py with the rest):
its effective settings inside the pod, from its own loader fed with the rendered ConfigMap,
env and args, against the worker's: it reads what the worker writes, connects the same
way, and never joins the worker's group; no GPU and small resources; its state in Kafka,
not on a volume; probes on its health port; locked down like the worker.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from consumer.cli import build_parser, overrides_from_flags
from consumer.config import WorkerSettings, load_settings
from consumer.summarize.command import summarize_overrides
from consumer.summarize.topics import topic_names
from deploy import manifests

POD_NAME = "emotion-summarizer-7c9d8f6b5-q4w2e"
COMPONENT = "app.kubernetes.io/component"


@pytest.fixture(params=manifests.overlay_names())
def objs(request: pytest.FixtureRequest, rendered: dict[str, list[dict[str, Any]]]) -> Any:
    return rendered[request.param]


def _deployment(objs: list[dict[str, Any]], component: str) -> dict[str, Any]:
    (found,) = [
        o
        for o in objs
        if o["kind"] == "Deployment" and o["metadata"]["labels"].get(COMPONENT) == component
    ]
    return found


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = container
    return result


def _env_value(var: dict[str, Any]) -> str:
    if "value" in var:
        return str(var["value"])
    source = var["valueFrom"]
    if "fieldRef" in source:
        return {"metadata.name": POD_NAME}[source["fieldRef"]["fieldPath"]]
    ref = source["secretKeyRef"]
    return f"<secret {ref['name']}/{ref['key']}>"


def _settings(
    objs: list[dict[str, Any]],
    component: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> tuple[WorkerSettings, Any]:
    """The effective settings of a Deployment's container, and its parsed args."""
    deployment = _deployment(objs, component)
    container = _container(deployment)
    assert "command" not in container, "keep the image's ENTRYPOINT (it receives SIGTERM)"
    args = build_parser().parse_args(container["args"])
    config = None
    if args.config is not None:
        path = PurePosixPath(str(args.config))
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        (mount,) = [
            m for m in container["volumeMounts"] if PurePosixPath(m["mountPath"]) == path.parent
        ]
        name = volumes[mount["name"]]["configMap"]["name"]
        (config_map,) = [
            o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name
        ]
        config = tmp_path / f"{component}.toml"
        config.write_text(config_map["data"][path.name], encoding="utf-8")
    for name in list(os.environ):
        if name.upper().startswith("EMOTION_WORKER_"):
            monkeypatch.delenv(name)
    with monkeypatch.context() as env:
        for var in container.get("env", []):
            env.setenv(var["name"], _env_value(var))
        flags = (
            summarize_overrides(args) if args.command == "summarize" else overrides_from_flags(args)
        )
        return load_settings(config, flags), args


def test_the_summarizer_reads_what_the_worker_writes_and_connects_the_same_way(
    objs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    summarizer, args = _settings(objs, "summarizer", monkeypatch, tmp_path)
    worker, _ = _settings(objs, "worker", monkeypatch, tmp_path)
    assert args.command == "summarize"
    topics = topic_names(summarizer)
    assert topics.results == worker.kafka.output_topic
    assert len({topics.results, topics.summaries, topics.state}) == 3
    assert summarizer.kafka.bootstrap_servers == worker.kafka.bootstrap_servers
    # Security and credentials: the same librdkafka settings, from the same Secret.
    assert summarizer.kafka.common_config == worker.kafka.common_config
    # Its own group: joining the worker's would take frames partitions from the workers.
    assert summarizer.summarize.group_id != worker.kafka.group_id
    # A stable identity per pod: static membership and the transactional id.
    assert summarizer.kafka.group_instance_id == POD_NAME


def test_one_small_pod_without_gpu_and_without_a_state_volume(objs: list[dict[str, Any]]) -> None:
    deployment = _deployment(objs, "summarizer")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1
    resources = _container(deployment)["resources"]
    assert "nvidia.com/gpu" not in resources.get("limits", {})
    assert "affinity" not in pod and "tolerations" not in pod, "no GPU nodes needed"
    assert resources["requests"]["cpu"] in ("100m", "250m")
    assert resources["limits"]["memory"].endswith("Mi")
    # The state is in the compacted state topic, restored on assignment: no claim.
    kinds = {key for volume in pod["volumes"] for key in volume if key != "name"}
    assert kinds == {"configMap", "emptyDir"}, kinds


def test_probes_reach_the_health_port_and_the_grace_period_covers_a_commit(
    objs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    settings, _ = _settings(objs, "summarizer", monkeypatch, tmp_path)
    deployment = _deployment(objs, "summarizer")
    container = _container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.health.enabled and settings.health.host == "0.0.0.0"
    expected = {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        http = container[probe]["httpGet"]
        assert http["path"] == path and ports[http["port"]] == settings.health.port, probe
    # The last transaction's commit is bounded by 30 s.
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30


def test_locked_down_with_its_own_account_and_service(objs: list[dict[str, Any]]) -> None:
    deployment = _deployment(objs, "summarizer")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    context = _container(deployment)["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    worker = _deployment(objs, "worker")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] != worker["serviceAccountName"]
    assert _container(deployment)["image"] == _container(_deployment(objs, "worker"))["image"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for service in (o for o in objs if o["kind"] == "Service"):
        selects = service["spec"]["selector"].items() <= labels.items()
        assert selects == (service["metadata"]["labels"].get(COMPONENT) == "summarizer")
    worker_labels = _deployment(objs, "worker")["spec"]["template"]["metadata"]["labels"]
    assert not deployment["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()
