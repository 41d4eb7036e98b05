"""docker/k8s: every manifest against the Kubernetes OpenAPI schemas (``kubernetes-validate``,
strict: unknown fields fail; its schemas ship in the wheel, so this runs offline), and the
references between them (names, labels, ports, settings, the autoscaling metric)."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from server.metrics import Metrics
from server.settings import Settings

from ._deploy import DOCKER, dockerfile_instructions, ess_setting_names

pytestmark = pytest.mark.deploy

K8S = DOCKER / "k8s"
KUBERNETES_VERSION = "1.33.0"  # a current minor; the manifests use only GA APIs
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def resources() -> dict[tuple[str, str], dict]:
    """(kind, name) -> manifest, over every file of docker/k8s."""
    out = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_kubernetes_schema(path):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install -e '.[test]' (the kubernetes-validate extra)")
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_a_field_the_schema_lacks_is_caught():
    """The schema check is live: a misspelt field fails it (strict mode)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    doc = resources()[("Service", "ess-serve")]
    bad = {**doc, "spec": {**doc["spec"], "selectr": {"a": "b"}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == [p.name for p in MANIFESTS]


def test_deployment_wiring():
    res = resources()
    dep = res[("Deployment", "ess-serve")]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = res[("Service", "ess-serve")]
    assert svc["spec"]["selector"].items() <= labels.items()
    job_labels = res[("Job", "ess-prepare")]["spec"]["template"]["metadata"]["labels"]
    assert not svc["spec"]["selector"].items() <= job_labels.items(), "the Service skips the Job"
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] in ports
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == ("/health", "http"), probe
    (ref,) = container["envFrom"]
    config = res[("ConfigMap", ref["configMapRef"]["name"])]["data"]
    assert int(config["ESS_PORT"]) == ports["http"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
    assert {("PersistentVolumeClaim", c) in res for c in claims} == {True}
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/models"]
    assert config["ESS_BASE_MODEL_DIR"].startswith("/models/")
    # Running requests drain (ESS_SHUTDOWN_TIMEOUT_SECONDS) before the kubelet kills the pod.
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(
        config["ESS_SHUTDOWN_TIMEOUT_SECONDS"])
    # The pod's uid is the image's ess user.
    useradd = next(r for k, r in dockerfile_instructions(DOCKER / "Dockerfile.cpu")
                   if k == "RUN" and "useradd" in r)
    uid = int(re.search(r"--uid (\d+)", useradd).group(1))
    assert pod["spec"]["securityContext"]["runAsUser"] == uid


def test_configmap_holds_valid_settings(monkeypatch):
    config = resources()[("ConfigMap", "ess-serve")]["data"]
    assert set(config) <= ess_setting_names()
    assert "ESS_API_KEYS" not in config, "keys belong in a Secret"
    for key in [k for k in os.environ if k.startswith("ESS_")]:
        monkeypatch.delenv(key)
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # raises on a value out of range
    assert settings.port == int(config["ESS_PORT"])
    assert str(settings.base_model_dir) == config["ESS_BASE_MODEL_DIR"]


def test_autoscaler_metric_is_the_servers_queue_gauge():
    res = resources()
    hpa = res[("HorizontalPodAutoscaler", "ess-serve")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "ess-serve"
    assert ("Deployment", hpa["spec"]["scaleTargetRef"]["name"]) in res
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name == Metrics().waiting._name
    adapter = yaml.safe_load(res[("ConfigMap", "ess-prometheus-adapter-rules")]["data"][
        "config.yaml"])
    (rule,) = adapter["rules"]
    assert rule["seriesQuery"].startswith(name + "{") and rule["name"]["as"] == name
