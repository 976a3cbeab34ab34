"""The Kubernetes manifests (deploy/k8s), rendered by kustomize and checked offline.

Core kinds against the Kubernetes API schemas (kubernetes-validate); KEDA's ScaledObject and
TriggerAuthentication and the Prometheus Operator's ServiceMonitor and PrometheusRule against
their projects' real CRDs (fetched as Go modules, deploy/manifests.py); then what the schemas
cannot know: the worker's effective settings inside the pod (its own config loader, fed with
the rendered ConfigMap, the container's env and args) against probes, ports, grace period,
volumes, the compile cache, the autoscaler's trigger and the Secret references. The alerts'
and the dashboard's own checks are in test_monitoring.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from consumer.cli import build_parser, overrides_from_flags
from consumer.config import WorkerSettings, load_settings
from consumer.ops.metrics import HealthState
from deploy import manifests
from tests.deploy.dockerfile import parse_dockerfile

REPO = Path(__file__).resolve().parents[2]
KUBERNETES_VERSIONS = ("1.32", kubernetes_validate.utils.latest_version())
POD_NAME = "emotion-worker-6f7d9c8b5-x2q7z"  # what metadata.name looks like in a pod
# The Kubernetes API's rule for environment variable names.
ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
SECRET_WORDS = ("password", "secret", "token", "sasl.username", "key.pem", "oauthbearer")
# KEDA v2.21's ScaledObject CRD has one CEL rule; a new one in a future pin must get a check.
KNOWN_CEL_RULES = {"minReplicaCount must be less than or equal to maxReplicaCount"}
# Where torch.compile's caches live in every overlay (a persistent volume where it compiles).
COMPILE_CACHE = PurePosixPath("/var/cache/emotion-worker/compile")
COMPILE_CACHE_DIRS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
# A new pod's worst case before /readyz: the checkpoint load plus compiling every batch bucket
# with a cold cache (the first pod after a torch/Triton/GPU change). Minutes; a floor for the
# rollout's progress deadline, not a measurement (bench/startup_check.py measures it).
COLD_START_FLOOR_S = 600
# librdkafka security settings -> what KEDA's (Sarama-based) Kafka scaler calls them.
KEDA_SASL = {
    "PLAIN": "plaintext",
    "SCRAM-SHA-256": "scram_sha256",
    "SCRAM-SHA-512": "scram_sha512",
    "OAUTHBEARER": "oauthbearer",
    "GSSAPI": "gssapi",
}


@dataclass(frozen=True)
class Profile:
    """What an overlay must provide."""

    gpu_product: str | None  # every allowed nvidia.com/gpu.product contains it; None: no GPU
    keda: bool
    scrape: str  # "servicemonitor" or "annotations"
    sasl: bool
    pinned_image: bool
    compiles: bool  # torch.compile at start-up: needs the persistent compile cache


PROFILES = {
    "a100-production": Profile(
        gpu_product="A100",
        keda=True,
        scrape="servicemonitor",
        sasl=True,
        pinned_image=True,
        compiles=True,
    ),
    "dev": Profile(
        gpu_product=None,
        keda=False,
        scrape="annotations",
        sasl=False,
        pinned_image=False,
        compiles=False,
    ),
}


# ----------------------------------------------------------------------------- helpers


def _of_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def _one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The worker's one object of this kind (the summarizer's: test_summarizer_manifests.py)."""
    found = [o for o in _of_kind(objs, kind) if _component(o) != "summarizer"]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _component(obj: dict[str, Any]) -> str | None:
    component = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")
    return None if component is None else str(component)


def _pod_spec(objs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = _one(objs, "Deployment")["spec"]["template"]["spec"]
    return spec


def _worker(objs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = _pod_spec(objs)["containers"]
    assert [c["name"] for c in containers] == ["worker"]
    container: dict[str, Any] = containers[0]
    return container


def _quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "20Gi", 2) as a number."""
    text = str(value)
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    units |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert match, text
    return float(match.group(1)) * units.get(match.group(2), 1 if not match.group(2) else math.nan)


def _env_value(var: dict[str, Any], objs: list[dict[str, Any]]) -> str:
    """The value the kubelet would give an env var (secrets as recognisable placeholders)."""
    if "value" in var:
        return str(var["value"])
    source = var["valueFrom"]
    if "fieldRef" in source:
        return {"metadata.name": POD_NAME}[source["fieldRef"]["fieldPath"]]
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        return f"<secret {ref['name']}/{ref['key']}>"
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        maps = [m for m in _of_kind(objs, "ConfigMap") if m["metadata"]["name"] == ref["name"]]
        assert maps, f"env {var['name']} refers to missing ConfigMap {ref['name']}"
        return str(maps[0]["data"][ref["key"]])
    raise AssertionError(f"env {var['name']}: unsupported source {source}")


def _mounted_file(objs: list[dict[str, Any]], container: dict[str, Any], path: str) -> str:
    """The content of a file that a ConfigMap volume puts at `path` in the container."""
    volumes = {v["name"]: v for v in _pod_spec(objs)["volumes"]}
    for mount in container.get("volumeMounts", []):
        folder = PurePosixPath(mount["mountPath"])
        if PurePosixPath(path).parent == folder and "configMap" in volumes[mount["name"]]:
            name = volumes[mount["name"]]["configMap"]["name"]
            maps = [m for m in _of_kind(objs, "ConfigMap") if m["metadata"]["name"] == name]
            assert maps, f"volume {mount['name']} refers to ConfigMap {name}, not rendered"
            data: dict[str, str] = maps[0]["data"]
            key = PurePosixPath(path).name
            assert key in data, f"ConfigMap {name} has no {key}"
            return data[key]
    raise AssertionError(f"no ConfigMap volume mounted at {PurePosixPath(path).parent}")


def _settings(
    objs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> WorkerSettings:
    """The worker's effective settings in the pod: its own loader, given the rendered config
    file, the container's environment and its command-line flags."""
    container = _worker(objs)
    assert "command" not in container, "keep the image's ENTRYPOINT (it receives SIGTERM)"
    args = build_parser().parse_args(container["args"])
    assert args.command == "run", container["args"]
    config = None
    if args.config is not None:
        config = tmp_path / "worker.toml"
        config.write_text(_mounted_file(objs, container, str(args.config)), encoding="utf-8")
    import os

    for name in list(os.environ):
        if name.upper().startswith("EMOTION_WORKER_"):
            monkeypatch.delenv(name)
    assert "envFrom" not in container, "envFrom hides which settings come from where"
    for var in container.get("env", []):
        monkeypatch.setenv(var["name"], _env_value(var, objs))
    return load_settings(config, overrides_from_flags(args))


def _compiles(objs: list[dict[str, Any]], settings: WorkerSettings) -> bool:
    """Whether the worker compiles at start-up, as consumer/engine/scoring.py decides:
    model.compile "on", or "auto" on CUDA (device "auto" is CUDA where the pod has a GPU)."""
    has_gpu = _worker(objs)["resources"].get("limits", {}).get("nvidia.com/gpu") is not None
    on_cuda = settings.model.device == "cuda" or (settings.model.device == "auto" and has_gpu)
    return settings.model.compile == "on" or (settings.model.compile == "auto" and on_cuda)


def _mount_of(container: dict[str, Any], path: PurePosixPath) -> dict[str, Any] | None:
    """The volume mount that holds `path` in the container (the deepest), None if none."""
    mounts = [m for m in container.get("volumeMounts", []) if path.is_relative_to(m["mountPath"])]
    return max(mounts, key=lambda m: len(m["mountPath"])) if mounts else None


def _deep_get(obj: dict[str, Any], *path: str) -> Any:
    for key in path:
        obj = obj.get(key, {})
    return obj


# ------------------------------------------------------------------------ the overlays


def test_every_overlay_has_a_profile() -> None:
    assert set(manifests.overlay_names()) == set(PROFILES)


@pytest.fixture(params=sorted(PROFILES))
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def objs(overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return rendered[overlay]


@pytest.fixture
def settings(
    objs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> WorkerSettings:
    return _settings(objs, monkeypatch, tmp_path)


# ---------------------------------------------------------------------------- schemas


CORE_KINDS = {
    "ServiceAccount",
    "ConfigMap",
    "Service",
    "Deployment",
    "PodDisruptionBudget",
    "PersistentVolumeClaim",
}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_match_the_kubernetes_api_schema(
    rendered: dict[str, list[dict[str, Any]]], version: str
) -> None:
    for name, objs in rendered.items():
        for obj in objs:
            if obj["kind"] not in CORE_KINDS:
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{name}: {obj['kind']} {obj['metadata']['name']}: {path}: {exc.message}"
                )


def _strict(schema: Any) -> Any:
    """A CRD's structural schema that also rejects unknown fields, as the API server does
    under kubectl's default strict field validation (a typo is an error, not dropped)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(schema["additionalProperties"])
    if "items" in schema:
        out["items"] = _strict(schema["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            out[key] = [_strict(s) for s in schema[key]]
    return out


def _cel_rules(schema: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(schema, dict):
        for rule in schema.get("x-kubernetes-validations", []):
            found.add(rule.get("message") or rule["rule"])
        for value in schema.values():
            found |= _cel_rules(value)
    elif isinstance(schema, list):
        for value in schema:
            found |= _cel_rules(value)
    return found


CUSTOM_KINDS = {("keda.sh", "ScaledObject"), ("keda.sh", "TriggerAuthentication")}
CUSTOM_KINDS |= {("monitoring.coreos.com", "ServiceMonitor")}
CUSTOM_KINDS |= {("monitoring.coreos.com", "PrometheusRule")}


def test_custom_resources_match_their_crds(
    rendered: dict[str, list[dict[str, Any]]], crds: dict[tuple[str, str], dict[str, Any]]
) -> None:
    checked = set()
    for name, objs in rendered.items():
        for obj in objs:
            group, _, version = obj["apiVersion"].rpartition("/")
            if obj["kind"] in CORE_KINDS:
                continue
            assert (group, obj["kind"]) in crds, f"{name}: no schema for {obj['kind']}"
            crd = crds[(group, obj["kind"])]
            assert crd["spec"]["scope"] == "Namespaced"
            served = {v["name"]: v for v in crd["spec"]["versions"] if v["served"]}
            assert version in served, f"{obj['kind']} {version} is not served (only {served})"
            schema = served[version]["schema"]["openAPIV3Schema"]
            assert _cel_rules(schema) <= KNOWN_CEL_RULES, _cel_rules(schema) - KNOWN_CEL_RULES
            errors = sorted(
                jsonschema.Draft4Validator(_strict(schema)).iter_errors(obj), key=lambda e: e.path
            )
            assert not errors, f"{name}: {obj['kind']}: " + "; ".join(
                f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors
            )
            meta = obj["metadata"]
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]), meta["name"]
            assert len(meta["name"]) <= 63
            checked.add(obj["kind"])
    assert checked == {kind for _, kind in CUSTOM_KINDS}


def test_strict_schema_catches_a_misspelt_field(
    crds: dict[tuple[str, str], dict[str, Any]],
) -> None:
    """The check above is not vacuous: a typo in the scale-down behaviour is an error."""
    schema = crds[("keda.sh", "ScaledObject")]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    typo = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "x"},
        "spec": {
            "scaleTargetRef": {"name": "x"},
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {"scaleDown": {"stabilisationWindowSeconds": 300}}
                }
            },
            "triggers": [{"type": "kafka", "metadata": {}}],
        },
    }
    assert list(jsonschema.Draft4Validator(_strict(schema)).iter_errors(typo))


# ------------------------------------------------------------------ the worker settings


def test_worker_config_loads(settings: WorkerSettings) -> None:
    """The rendered ConfigMap, env and args make a valid config (unknown keys are errors)."""
    assert settings.processes.devices == "single", "one worker process per pod and GPU"


def test_env_var_names_are_valid(objs: list[dict[str, Any]]) -> None:
    for container in _pod_spec(objs)["containers"] + _pod_spec(objs).get("initContainers", []):
        for var in container.get("env", []):
            assert ENV_NAME.fullmatch(var["name"]), var["name"]


def test_probes_hit_the_health_port(objs: list[dict[str, Any]], settings: WorkerSettings) -> None:
    container = _worker(objs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert settings.health.enabled
    assert settings.health.host == "0.0.0.0", "the kubelet probes the pod IP, not loopback"
    expected = {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        http = container[probe]["httpGet"]
        assert http["path"] == path, probe
        port = ports[http["port"]] if isinstance(http["port"], str) else http["port"]
        assert port == settings.health.port, (
            f"{probe} on {port}, health.port {settings.health.port}"
        )
    # The start-up probe must give the interpreter time to import torch on a busy node.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


def test_grace_period_outlasts_the_drain(
    objs: list[dict[str, Any]], settings: WorkerSettings
) -> None:
    pod = _pod_spec(objs)
    # Drain, then flush, commit and close (~10 s), before the kubelet's SIGKILL.
    assert pod["terminationGracePeriodSeconds"] > settings.flow.drain_timeout_s + 10
    # SIGTERM itself starts the drain; a preStop hook would only delay it.
    assert "lifecycle" not in _worker(objs)


def test_static_membership_uses_the_pod_name(
    objs: list[dict[str, Any]], settings: WorkerSettings
) -> None:
    env = {v["name"]: v for v in _worker(objs)["env"]}
    var = env["EMOTION_WORKER_KAFKA__GROUP_INSTANCE_ID"]
    assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert settings.kafka.group_instance_id == POD_NAME


def test_model_is_read_from_a_read_only_volume(
    overlay: str, objs: list[dict[str, Any]], settings: WorkerSettings
) -> None:
    container = _worker(objs)
    volumes = {v["name"]: v for v in _pod_spec(objs)["volumes"]}
    model = PurePosixPath(str(settings.model.path))
    assert model.is_absolute(), model
    mounts = [
        m for m in container["volumeMounts"] if model.is_relative_to(PurePosixPath(m["mountPath"]))
    ]
    assert mounts, f"model.path {model} is on no volume (it would come from the image)"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    assert mount.get("readOnly") is True, f"{mount['name']} must be mounted read-only"
    volume = volumes[mount["name"]]
    if "persistentVolumeClaim" in volume:
        assert volume["persistentVolumeClaim"].get("readOnly") is True
        assert volume["persistentVolumeClaim"]["claimName"]
    elif PROFILES[overlay].gpu_product is not None:
        pytest.fail(f"a GPU overlay must read the checkpoint from a volume claim, not {volume}")
    else:
        # Without a claim (dev), an init container must write the checkpoint there.
        writers = [
            c
            for c in _pod_spec(objs).get("initContainers", [])
            if any(m["name"] == mount["name"] for m in c.get("volumeMounts", []))
        ]
        assert writers, f"nothing writes the model into volume {mount['name']}"
        args = build_parser().parse_args(writers[0]["args"])
        assert args.command == "make-tiny-model" and PurePosixPath(str(args.path)) == model


def test_pods_run_locked_down(objs: list[dict[str, Any]], settings: WorkerSettings) -> None:
    pod = _pod_spec(objs)
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security.get("runAsUser", 1) != 0
    assert security["seccompProfile"]["type"] == "RuntimeDefault"
    # The image's user (Dockerfile USER) is the one the pod runs as.
    dockerfile = parse_dockerfile(REPO / "Dockerfile")
    final = dockerfile.in_stage(dockerfile.final_stage)
    user = [i.value for i in final if i.keyword == "USER"][-1]
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == user
    assert pod["automountServiceAccountToken"] is False
    # Volumes made group-writable (fsGroup) for the image's group, no other.
    assert security.get("fsGroup", security["runAsGroup"]) == security["runAsGroup"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert "add" not in context["capabilities"], container["name"]
        # The image writes its caches under /tmp: it must be a writable emptyDir.
        tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], container["name"]
        assert not tmp[0].get("readOnly"), container["name"]
        assert "sizeLimit" in volumes[tmp[0]["name"]]["emptyDir"], container["name"]


# ------------------------------------------------------------------ the compile cache


def test_profile_says_which_overlays_compile(
    overlay: str, objs: list[dict[str, Any]], settings: WorkerSettings
) -> None:
    """The compile-cache checks below key on Profile.compiles; it must be what the engine does."""
    assert _compiles(objs, settings) == PROFILES[overlay].compiles


def test_compile_cache_is_on_a_writable_volume_that_outlives_the_pod(
    overlay: str, objs: list[dict[str, Any]], settings: WorkerSettings
) -> None:
    """torch.compile's caches are where the env says, on a writable mount (the root file
    system is read-only), and where the worker compiles, on a claim every pod shares: a new
    pod (rollout, scale-up, reschedule) starts warm."""
    container = _worker(objs)
    pod = _pod_spec(objs)
    env = {v["name"]: _env_value(v, objs) for v in container["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    dirs = [PurePosixPath(env[name]) for name in COMPILE_CACHE_DIRS]
    assert len(set(dirs)) == len(dirs), "inductor and Triton share one folder"
    # On, whatever torch's default of the day (the image sets neither).
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == "1"
    assert env["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"
    for name, folder in zip(COMPILE_CACHE_DIRS, dirs, strict=True):
        # The same place in every overlay (and not the image's /tmp default).
        assert folder.is_absolute() and folder.is_relative_to(COMPILE_CACHE), f"{name}={folder}"
        mount = _mount_of(container, folder)
        assert mount is not None, f"{name}={folder} is on the read-only root file system"
        assert PurePosixPath(mount["mountPath"]) == COMPILE_CACHE, f"{name} on {mount}"
        assert not mount.get("readOnly"), f"{mount['name']} is mounted read-only"
        # The kubelet creates a missing subPath folder owned by root: uid 10001 could not
        # write in it.
        assert "subPath" not in mount and "subPathExpr" not in mount, mount
        volume = volumes[mount["name"]]
        if not PROFILES[overlay].compiles:
            assert "emptyDir" in volume or "persistentVolumeClaim" in volume, volume
            continue
        assert "persistentVolumeClaim" in volume, (
            f"{name} on {volume}: an emptyDir (or /tmp) is gone with the pod, so every new "
            "pod would compile every bucket again; use a claim"
        )
        ref = volume["persistentVolumeClaim"]
        assert not ref.get("readOnly"), ref
        # The overlay creates the claim (disposable, unlike the model's), shared by all pods:
        # KEDA's replicas and a surge rollout's pods run on several nodes at once.
        claims = [
            c
            for c in _of_kind(objs, "PersistentVolumeClaim")
            if c["metadata"]["name"] == ref["claimName"]
        ]
        assert claims, f"claim {ref['claimName']} is not rendered by {overlay}"
        (claim,) = claims
        namespace = _one(objs, "Deployment")["metadata"].get("namespace")
        assert claim["metadata"].get("namespace") == namespace
        assert "ReadWriteMany" in claim["spec"]["accessModes"], (
            "pods on several nodes mount the cache at once: ReadWriteOnce would leave all "
            "but one node's pods in ContainerCreating (Multi-Attach)"
        )
        assert _quantity(claim["spec"]["resources"]["requests"]["storage"]) >= 4 * 2**30


def test_compile_cache_is_the_same_path_and_one_claim_per_overlay(
    rendered: dict[str, list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Every compiling overlay uses the same cache paths, each on its own claim: caches of
    different GPU products (another overlay) never mix, which keeps their size and their
    clean-up apart (the keys would keep their entries apart anyway)."""
    paths: dict[str, set[tuple[str, str]]] = {}
    claims: dict[tuple[str | None, str], str] = {}
    for name, profile in sorted(PROFILES.items()):
        if not profile.compiles:
            continue
        objs = rendered[name]
        container = _worker(objs)
        env = {v["name"]: _env_value(v, objs) for v in container["env"]}
        paths[name] = {(var, env[var]) for var in COMPILE_CACHE_DIRS}
        mount = _mount_of(container, COMPILE_CACHE)
        assert mount is not None
        (volume,) = [v for v in _pod_spec(objs)["volumes"] if v["name"] == mount["name"]]
        namespace = _one(objs, "Deployment")["metadata"].get("namespace")
        key = (namespace, volume["persistentVolumeClaim"]["claimName"])
        assert key not in claims, f"{name} and {claims[key]} share the compile cache {key}"
        claims[key] = name
    assert paths, "no overlay compiles: Profile.compiles is wrong"
    assert len({frozenset(p) for p in paths.values()}) == 1, paths


def test_not_ready_until_warm_up_ends(objs: list[dict[str, Any]], settings: WorkerSettings) -> None:
    """/readyz stays 503 until every bucket is compiled (or loaded from the cache), while /livez
    stays 200 however long a cold compile takes: no probe kills it, the rollout's progress
    deadline bounds it."""
    container = _worker(objs)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    # consumer/cli.py sets model_ready only after engine.warm_up().
    health = HealthState(settings.health.loop_stall_s, settings.health.stall_timeout_s)
    health.subscribed = True
    # Half an hour into a cold warm-up: no poll loop yet, no progress, no lag known.
    health.last_loop -= 1800
    health.last_progress -= 1800
    ready, why = health.readiness()
    assert not ready and "warm" in why, why
    assert health.liveness()[0], "a long warm-up must not fail /livez (restart loop)"
    health.model_ready = True
    assert health.readiness()[0], "ready once warm (the check above is not vacuous)"
    deployment = _one(objs, "Deployment")
    assert deployment["spec"]["progressDeadlineSeconds"] >= COLD_START_FLOOR_S


def test_resources(overlay: str, objs: list[dict[str, Any]], settings: WorkerSettings) -> None:
    pod = _pod_spec(objs)
    profile = PROFILES[overlay]
    for container in pod["containers"] + pod.get("initContainers", []):
        requests = container["resources"]["requests"]
        limits = container["resources"]["limits"]
        for resource in ("cpu", "memory"):
            assert _quantity(requests[resource]) <= _quantity(limits[resource]), resource
    worker = _worker(objs)["resources"]
    gpus = worker["limits"].get("nvidia.com/gpu")
    if profile.gpu_product is None:
        assert gpus is None and settings.model.device == "cpu"
        return
    # One GPU per pod (set as a limit; Kubernetes copies it into requests).
    assert int(gpus) == 1
    assert settings.model.device in ("cuda", "auto")
    # Sizing from docs/benchmarks.md: the engine process ~1 core plus decoding; the 14 GB
    # checkpoint passes through host memory while loading.
    assert _quantity(worker["requests"]["cpu"]) >= 1.5
    assert _quantity(worker["requests"]["memory"]) >= 20 * 2**30
    if settings.faces.detector == "haar":
        assert _quantity(worker["requests"]["cpu"]) >= 12, "Haar needs 12-16 cores per GPU"
    # Only whole GPUs of the overlay's product, and the taint of GPU nodes tolerated.
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    expressions = [e for t in terms["nodeSelectorTerms"] for e in t["matchExpressions"]]
    (product,) = [e for e in expressions if e["key"] == "nvidia.com/gpu.product"]
    assert product["operator"] == "In" and product["values"]
    for value in product["values"]:
        assert profile.gpu_product in value and "MIG" not in value, value
    if profile.gpu_product == "A100":
        assert settings.model.precision != "fp8", "A100 (compute capability 8.0) has no FP8"
    assert any(
        t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"]
    )


def test_image_reference(overlay: str, objs: list[dict[str, Any]]) -> None:
    pod = _pod_spec(objs)
    for container in pod["containers"] + pod.get("initContainers", []):
        image = container["image"]
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert name and tag, f"{image}: give a tag or digest"
        if PROFILES[overlay].pinned_image:
            assert tag not in ("latest", "dev") and "/" in name, image


def test_services_and_budgets_select_the_worker_pods(objs: list[dict[str, Any]]) -> None:
    deployment = _one(objs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = _one(objs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    budget = _one(objs, "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1
    account = _one(objs, "ServiceAccount")["metadata"]["name"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account


def test_metrics_are_scraped(
    overlay: str, objs: list[dict[str, Any]], settings: WorkerSettings
) -> None:
    container = _worker(objs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    annotations = _one(objs, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    monitors = _of_kind(objs, "ServiceMonitor")
    if PROFILES[overlay].scrape == "annotations":
        assert not monitors
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == settings.health.port
        assert annotations["prometheus.io/path"] == "/metrics"
        return
    assert "prometheus.io/scrape" not in annotations, "scraped twice"
    (monitor,) = monitors
    service = _one(objs, "Service")
    assert monitor["metadata"].get("namespace") == service["metadata"].get("namespace")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["path"] == "/metrics"
        target = service_ports[endpoint["port"]]["targetPort"]
        number = ports[target] if isinstance(target, str) else target
        assert number == settings.health.port


def test_secrets_come_only_from_secrets(
    overlay: str, objs: list[dict[str, Any]], settings: WorkerSettings
) -> None:
    pod = _pod_spec(objs)
    for container in pod["containers"] + pod.get("initContainers", []):
        for var in container.get("env", []):
            if any(word in var["name"].lower() for word in SECRET_WORDS):
                assert "secretKeyRef" in var.get("valueFrom", {}), var["name"]
    assert not _of_kind(objs, "Secret"), "no Secret objects in the repository"
    for config_map in _of_kind(objs, "ConfigMap"):
        for text in config_map["data"].values():
            for line in text.splitlines():
                code = line.split("#", 1)[0].lower()
                assert not any(word in code for word in SECRET_WORDS), line
    common = settings.kafka.common_config
    protocol = str(common.get("security.protocol", "PLAINTEXT")).upper()
    assert protocol.startswith("SASL_") == PROFILES[overlay].sasl
    if PROFILES[overlay].sasl:
        # Merged from the Secret's env vars into the ConfigMap's common_config.
        assert str(common["sasl.username"]).startswith("<secret ")
        assert str(common["sasl.password"]).startswith("<secret ")
        assert "security.protocol" in common and "sasl.mechanism" in common


# ---------------------------------------------------------------------------- autoscaling


@dataclass(frozen=True)
class KedaParam:
    name: str
    go_type: str
    orders: tuple[str, ...]
    enum: tuple[str, ...] | None
    required: bool


def _keda_kafka_params(source: str) -> dict[str, KedaParam]:
    """The Kafka scaler's parameters, from the struct tags of its metadata type."""
    start = source.index("type kafkaMetadata struct {")
    block = source[start : source.index("\n}\n", start)]
    params = {}
    for _field, go_type, tag in re.findall(
        r"^\s*(\w+)\s+([\w.\[\]]+)\s+`keda:\"([^\"]*)\"`", block, re.M
    ):
        parts = dict(p.partition("=")[::2] for p in tag.split(","))
        enum = tuple(parts["enum"].split(";")) if "enum" in parts else None
        required = "optional" not in parts and "default" not in parts
        params[parts["name"]] = KedaParam(
            parts["name"], go_type, tuple(parts["order"].split(";")), enum, required
        )
    assert {"bootstrapServers", "consumerGroup", "topic", "lagThreshold"} <= set(params), (
        "KEDA's kafka_scaler.go no longer looks as expected; update _keda_kafka_params"
    )
    return params


def _keda_overlays() -> list[str]:
    return sorted(name for name, p in PROFILES.items() if p.keda)


@pytest.fixture(params=_keda_overlays())
def keda_overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def test_overlays_without_keda_have_no_scaler(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for name, profile in PROFILES.items():
        assert bool(_of_kind(rendered[name], "ScaledObject")) == profile.keda, name


def test_lag_threshold_and_replica_bounds(
    keda_overlay: str,
    rendered: dict[str, list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    objs = rendered[keda_overlay]
    settings = _settings(objs, monkeypatch, tmp_path)
    scaled = _one(objs, "ScaledObject")
    notes = scaled["metadata"]["annotations"]
    rate = float(notes["emotion-worker/replica-events-per-second"])
    backlog_s = float(notes["emotion-worker/tolerated-backlog-seconds"])
    partitions = int(notes["emotion-worker/input-partitions"])
    spec = scaled["spec"]
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    # The derivation of docs/operations.md: the backlog one replica may hold.
    assert int(meta["lagThreshold"]) == round(rate * backlog_s)
    # A healthy replica's own lag (events in flight + one commit interval of finished ones)
    # must not look like a backlog.
    own_lag = settings.flow.max_in_flight + settings.kafka.commit_interval_s * rate
    assert int(meta["lagThreshold"]) > 2 * own_lag
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
    if meta.get("ensureEvenDistributionOfPartitions") == "true":
        for bound in (spec["minReplicaCount"], spec["maxReplicaCount"]):
            assert partitions % bound == 0, f"{bound} replicas split {partitions} unevenly"
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    down = behavior["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 120
    assert down["policies"] and all(
        p["type"] == "Pods" and p["value"] == 1 and p["periodSeconds"] >= 60
        for p in down["policies"]
    )


def test_scaler_targets_the_worker_and_its_group(
    keda_overlay: str,
    rendered: dict[str, list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    objs = rendered[keda_overlay]
    settings = _settings(objs, monkeypatch, tmp_path)
    scaled = _one(objs, "ScaledObject")
    deployment = _one(objs, "Deployment")
    target = scaled["spec"]["scaleTargetRef"]
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    assert target.get("kind", "Deployment") == "Deployment"
    assert target["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == settings.kafka.group_id
    assert meta["topic"] == settings.kafka.input_topic
    servers = {s.strip() for s in meta["bootstrapServers"].split(",")}
    assert servers == {s.strip() for s in settings.kafka.bootstrap_servers.split(",")}
    reset = {**settings.kafka.common_config, **settings.kafka.consumer_config}.get(
        "auto.offset.reset",
        "earliest",  # consumer/stream/kafka_io.py's default
    )
    assert meta.get("offsetResetPolicy", "latest") == reset
    # KEDA connects the way the worker does.
    common = settings.kafka.common_config
    protocol = str(common.get("security.protocol", "PLAINTEXT")).upper()
    assert (meta.get("tls", "disable") == "enable") == protocol.endswith("SSL")
    if protocol.startswith("SASL_"):
        assert meta["sasl"] == KEDA_SASL[str(common["sasl.mechanism"]).upper()]
    else:
        assert meta.get("sasl", "none") == "none"


def test_trigger_metadata_is_what_kedas_kafka_scaler_reads(
    keda_overlay: str, rendered: dict[str, list[dict[str, Any]]], keda_kafka_scaler: str
) -> None:
    params = _keda_kafka_params(keda_kafka_scaler)
    objs = rendered[keda_overlay]
    (trigger,) = _one(objs, "ScaledObject")["spec"]["triggers"]
    meta = trigger["metadata"]
    auth_names = set()
    if "authenticationRef" in trigger:
        auth = [
            a
            for a in _of_kind(objs, "TriggerAuthentication")
            if a["metadata"]["name"] == trigger["authenticationRef"]["name"]
        ]
        assert auth, f"authenticationRef {trigger['authenticationRef']} is not rendered"
        auth_names = {ref["parameter"] for ref in auth[0]["spec"]["secretTargetRef"]}
    for key, value in meta.items():
        assert key in params and "triggerMetadata" in params[key].orders, (
            f"KEDA's Kafka scaler reads no trigger metadata {key!r}"
        )
        param = params[key]
        if param.enum:
            assert value in param.enum, f"{key}={value!r}, not one of {param.enum}"
        if param.go_type == "bool":
            assert value in ("true", "false"), key
        if param.go_type == "int64":
            assert int(value) > 0, key
    for key in auth_names:
        assert key in params and "authParams" in params[key].orders, key
    for name, param in params.items():
        if param.required:
            assert name in meta or name in auth_names, f"{name} is required"


def test_scaler_uses_the_workers_credentials(
    keda_overlay: str, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    objs = rendered[keda_overlay]
    (trigger,) = _one(objs, "ScaledObject")["spec"]["triggers"]
    env = {v["name"]: v for v in _worker(objs)["env"]}
    prefix = "EMOTION_WORKER_KAFKA__COMMON_CONFIG__"
    worker = {
        name.removeprefix(prefix): var["valueFrom"]["secretKeyRef"]
        for name, var in env.items()
        if name.startswith(prefix) and "secretKeyRef" in var.get("valueFrom", {})
    }
    if not worker:
        assert "authenticationRef" not in trigger
        return
    (auth,) = [
        a
        for a in _of_kind(objs, "TriggerAuthentication")
        if a["metadata"]["name"] == trigger["authenticationRef"]["name"]
    ]
    keda = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
    for keda_name, rdkafka_name in (("username", "sasl.username"), ("password", "sasl.password")):
        assert (keda[keda_name]["name"], keda[keda_name]["key"]) == (
            worker[rdkafka_name]["name"],
            worker[rdkafka_name]["key"],
        ), keda_name
