"""deploy/k8s: every object valid against the Kubernetes OpenAPI schemas (offline, strict) and wired together.

The schemas are the ones `kubernetes-validate` bundles (no cluster, no network). The Prometheus Operator
objects have no bundled schema and are checked by hand. With `kustomize` or `kubectl` on the PATH the
kustomization is built too and its output validated.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes the manifests need (the preStop `sleep` action is on from 1.30) and the newest bundled.
VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
CRD_API = "monitoring.coreos.com/v1"
ALTERNATIVES = {"servicemonitor.yaml", "podmonitor.yaml"}  # kustomization.yaml lists exactly one of them

Obj = dict[str, Any]


def _load(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


MANIFESTS = {
    p.name: _load(p) for p in sorted(K8S.glob("*.yaml")) if not p.name.endswith(("kustomization.yaml", "values.yaml"))
}
OBJECTS = [obj for objs in MANIFESTS.values() for obj in objs]
KUSTOMIZATION: Obj = yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _one(kind: str) -> Obj:
    found = [obj for obj in OBJECTS if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod() -> Obj:
    return _one("Deployment")["spec"]["template"]


def _container() -> Obj:
    (container,) = _pod()["spec"]["containers"]
    return container


def _settings() -> Settings:
    """Settings as the ConfigMap makes them (validated the way the server validates its environment)."""
    return Settings(**{name.removeprefix("CPM2_").lower(): value for name, value in _one("ConfigMap")["data"].items()})


def _validate(objects: list[Obj], version: str) -> None:
    problems = []  # each in one line: the exception's own message prints the whole schema
    for obj in (obj for obj in objects if obj["apiVersion"] != CRD_API):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = "/".join(map(str, error.absolute_path))
            problems.append(f"{obj['kind']} {obj['metadata']['name']}: {where}: {error.message}")
    assert not problems, f"invalid for Kubernetes {version}:\n" + "\n".join(problems)


@pytest.mark.parametrize("version", VERSIONS)
def test_objects_match_the_kubernetes_schemas(version: str) -> None:
    _validate(OBJECTS, version)
    assert all("namespace" not in obj["metadata"] for obj in OBJECTS), "kustomization.yaml sets the namespace"


def test_kustomization_lists_every_manifest() -> None:
    listed = set(KUSTOMIZATION["resources"])
    assert len(listed & ALTERNATIVES) == 1, f"list one of {sorted(ALTERNATIVES)}"
    assert listed | ALTERNATIVES == set(MANIFESTS) | ALTERNATIVES
    assert all((K8S / name).is_file() for name in listed)


def test_kustomize_build_is_valid() -> None:
    tool = shutil.which("kustomize") or shutil.which("kubectl")
    if tool is None:
        pytest.skip("neither kustomize nor kubectl on the PATH")
    command = [tool, "build" if Path(tool).name == "kustomize" else "kustomize", str(K8S)]
    built = [doc for doc in yaml.safe_load_all(subprocess.check_output(command, timeout=60)) if doc]
    listed = [obj for name in KUSTOMIZATION["resources"] for obj in MANIFESTS[name]]
    assert sorted(obj["kind"] for obj in built) == sorted(obj["kind"] for obj in listed)
    _validate(built, VERSIONS[-1])
    namespaced = [obj for obj in built if obj["kind"] != "Namespace"]
    assert {obj["metadata"]["namespace"] for obj in namespaced} == {KUSTOMIZATION["namespace"]}


def test_labels_and_selectors_agree() -> None:
    deployment, service, pod = _one("Deployment"), _one("Service"), _pod()
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"] == selector
    assert _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert _one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    target = _one("HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    (term,) = pod["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == selector
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    service_ports = {port["name"]: port for port in service["spec"]["ports"]}
    container_ports = {port["name"]: port["containerPort"] for port in _container()["ports"]}
    assert service_ports["http"]["targetPort"] in container_ports
    monitor, pod_monitor = _one("ServiceMonitor"), _one("PodMonitor")
    assert monitor["apiVersion"] == pod_monitor["apiVersion"] == CRD_API
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    pairs = [
        (monitor["spec"]["endpoints"], service_ports),
        (pod_monitor["spec"]["podMetricsEndpoints"], container_ports),
    ]
    for endpoints, ports in pairs:
        assert [(endpoint["port"] in ports, endpoint["path"]) for endpoint in endpoints] == [(True, "/metrics")]


def test_pod_is_wired_and_locked_down() -> None:
    spec, container = _pod()["spec"], _container()
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert all(mount["name"] in volumes for mount in mounts.values())
    claims = {obj["metadata"]["name"]: obj for obj in OBJECTS if obj["kind"] == "PersistentVolumeClaim"}
    for path, mode, read_only in [("/models", "ReadOnlyMany", True), ("/data/prompts", "ReadWriteMany", False)]:
        volume = volumes[mounts[path]["name"]]["persistentVolumeClaim"]
        assert claims[volume["claimName"]]["spec"]["accessModes"] == [mode]
        assert mounts[path].get("readOnly", False) is volume.get("readOnly", False) is read_only
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]

    ports = {port["name"] for port in container["ports"]}
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert [probe["path"] for probe in probes.values()] == ["/ready", "/ready", "/health"]
    assert all(probe["port"] in ports for probe in probes.values())
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 600

    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys() & container["resources"]["limits"].keys()
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    pod_security, security = spec["securityContext"], container["securityContext"]
    assert (pod_security["runAsNonRoot"], pod_security["runAsUser"], pod_security["fsGroup"]) == (True, 10001, 10001)
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert (security["readOnlyRootFilesystem"], security["allowPrivilegeEscalation"]) == (True, False)
    assert security["capabilities"] == {"drop": ["ALL"]}
    # A Service named cpm2 would otherwise inject CPM2_PORT=tcp://...:8080, which the server reads.
    assert spec["enableServiceLinks"] is False


def test_environment_is_settings() -> None:
    container, config = _container(), _one("ConfigMap")["data"]
    (source,) = container["envFrom"]
    assert source["configMapRef"]["name"] == _one("ConfigMap")["metadata"]["name"]
    names = [*config, *(env["name"] for env in container["env"])]
    unknown = [
        name
        for name in names
        if not name.startswith("CPM2_") or name.removeprefix("CPM2_").lower() not in Settings.model_fields
    ]
    assert not unknown, f"not server.settings.Settings fields: {unknown}"
    optional = {env["name"]: env["valueFrom"]["secretKeyRef"]["optional"] for env in container["env"]}
    # Prompt writes need the admin token (closed without it; no pod-local trust behind a Service).
    assert optional == {"CPM2_API_KEY": True, "CPM2_ADMIN_TOKEN": False}
    assert "CPM2_ALLOW_LOCAL_ADMIN" not in names
    settings = _settings()
    assert settings.port == next(port["containerPort"] for port in container["ports"] if port["name"] == "http")
    assert settings.host == "0.0.0.0"
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert str(settings.prompt_store) in mounts
    assert settings.model.startswith(("/models/", "builtin:"))


def test_grace_period_covers_the_drain() -> None:
    # SIGTERM comes after preStop; the server drains for shutdown_timeout, then uvicorn waits up to
    # shutdown_timeout + 5 s more for connections (server/cli.py); SIGKILL comes at the grace period.
    spec = _pod()["spec"]
    pre_stop = _container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 1 <= pre_stop <= 15
    assert spec["terminationGracePeriodSeconds"] > pre_stop + 2 * _settings().shutdown_timeout + 5


def test_autoscaler_metric_is_exported_and_served() -> None:
    hpa = _one("HorizontalPodAutoscaler")["spec"]
    (metric,) = hpa["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert (metric["type"], metric["pods"]["target"]["type"]) == ("Pods", "AverageValue")
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert hpa["minReplicas"] <= _one("Deployment")["spec"]["replicas"] <= hpa["maxReplicas"]
    assert f'"{name}"' in (ROOT / "server" / "metrics.py").read_text()
    values = _load(K8S / "prometheus-adapter-values.yaml")[0]
    (rule,) = [rule for rule in values["rules"]["custom"] if rule["name"]["as"] == name]
    assert rule["seriesQuery"].startswith(name + "{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]
