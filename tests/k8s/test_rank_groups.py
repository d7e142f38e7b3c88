"""Offline checks of the examples whose replicas span several GPUs (overlays gpu-tp and
gpu-pp): their pods, their kvray config, and broken variants that must fail naming the field."""

from __future__ import annotations

import shutil

import pytest
import yaml

from tests.k8s import validate as v
from tests.k8s.invariants import find
from tests.k8s.test_manifests import K8S, assert_fails_naming, set_config, worker_group

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is a dev dependency"
)


@pytest.fixture(scope="module")
def gpu_tp():
    return v.render(K8S / "overlays" / "gpu-tp")


@pytest.fixture(scope="module")
def gpu_pp():
    return v.render(K8S / "overlays" / "gpu-pp")


@pytest.fixture(scope="module")
def cpu_dev():
    return v.render(K8S / "overlays" / "cpu-dev")


def kvray_config(docs):
    """The overlay's config.yaml, loaded with kvray's own loader."""
    from kvray.cluster.config import load

    text = find(docs, "ConfigMap", "kvray-config")["data"]["config.yaml"]
    return load(yaml.safe_load(text), environ={})


def worker_container(docs):
    return worker_group(docs)["template"]["spec"]["containers"][0]


def test_the_tensor_parallel_example_gives_each_replica_a_pod_of_two_gpus(gpu_tp):
    config = kvray_config(gpu_tp)
    assert config.engine.worker.tensor_parallel_size == 2
    assert config.gpus_per_replica == 1  # per rank
    container = worker_container(gpu_tp)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    volumes = worker_group(gpu_tp)["template"]["spec"]["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in volumes


def test_the_pipeline_example_validates_but_for_what_this_kvray_cannot_run(gpu_pp):
    """gpu-pp: two stages of four ranks, a 4-GPU pod each. Every check passes; kvray's loader
    refuses pipeline_parallel_size 2 until kvray has pipeline stages, and accepts it after."""
    errors = v.validate(gpu_pp)
    if v.has_pipeline_stages():
        assert errors == []
    else:
        assert len(errors) == 1 and "pipeline_parallel_size 2" in errors[0], errors
    settings = yaml.safe_load(find(gpu_pp, "ConfigMap", "kvray-config")["data"]["config.yaml"])
    assert (settings["tensor_parallel_size"], settings["pipeline_parallel_size"]) == (4, 2)
    container = worker_container(gpu_pp)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"  # one stage a pod
    assert worker_group(gpu_pp)["maxReplicas"] == 2 * settings["max_replicas"]
    assert {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"} in container["env"]


def set_worker_gpus(docs, count: str):
    worker_container(docs)["resources"] = {
        "requests": {"cpu": "16", "nvidia.com/gpu": count},
        "limits": {"cpu": "16", "nvidia.com/gpu": count},
    }


def drop_mount(docs, path: str):
    mounts = worker_container(docs)["volumeMounts"]
    mounts[:] = [m for m in mounts if m["mountPath"] != path]


BROKEN_TP = {
    "a pod with fewer GPUs than a replica's ranks": (
        lambda d: set_worker_gpus(d, "1"),
        "need {'CPU': 2.0, 'GPU': 2.0} on one Ray node, and a worker pod is one",
    ),
    "no /dev/shm for NCCL": (
        lambda d: drop_mount(d, "/dev/shm"),
        "share this pod through NCCL, which needs /dev/shm",
    ),
    "/dev/shm on disk": (
        lambda d: next(
            vol for vol in worker_group(d)["template"]["spec"]["volumes"] if vol["name"] == "dshm"
        ).update(emptyDir={}),
        "mount an emptyDir with medium: Memory at /dev/shm",
    ),
    "more replicas than the pods hold": (
        lambda d: set_config(d, max_replicas=3),
        "max_replicas 3 x pipeline_parallel_size 1 = 3 stages",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_TP))
def test_broken_tensor_parallel_manifest_fails_naming_the_field(gpu_tp, case):
    assert_fails_naming(gpu_tp, *BROKEN_TP[case])


def only_ray_ports_between_pods(docs):
    rule = find(docs, "NetworkPolicy", "kvray-ray-cluster")["spec"]["ingress"][0]
    rule["ports"] = [{"port": 6379}, {"port": 8265}]


BROKEN_PP = {
    "pods of one stage only": (
        lambda d: worker_group(d).update(maxReplicas=1),
        "max_replicas 2 x pipeline_parallel_size 2 = 4 stages",
    ),
    "worker pods reach each other on some ports only": (
        only_ray_ports_between_pods,
        "reach each other only on some ports",
    ),
    "a pod with fewer GPUs than a stage's ranks": (
        lambda d: set_worker_gpus(d, "2"),
        "need {'CPU': 4.0, 'GPU': 4.0} on one Ray node",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_PP))
def test_broken_pipeline_manifest_fails_naming_the_field(gpu_pp, case):
    assert_fails_naming(gpu_pp, *BROKEN_PP[case])


def test_a_cpu_replica_bigger_than_its_pod_fails(cpu_dev):
    assert_fails_naming(
        cpu_dev,
        lambda d: set_config(d, cpus_per_replica=2),
        "need {'CPU': 2.0} on one Ray node",
    )
