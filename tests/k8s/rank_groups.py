"""Invariants of replicas split over several ranks (tensor_parallel_size, pipeline_parallel_size)
on Kubernetes: what Ray's placement asks of the worker pods. A worker pod is one Ray node, and
Ray places a stage's ranks (all of a replica's at pipeline_parallel_size 1) on one node.
Every error names the resource and field."""

from __future__ import annotations

import math
import re
from typing import Any

from tests.k8s.invariants import Doc, ray_head, router_settings, selects

CPU_QUANTITY = re.compile(r"^([0-9.]+)(m?)$")


def _name(doc: Doc) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def check_rank_groups(docs: list[Doc]) -> list[str]:
    service = ray_head(docs)
    if service is None:
        return []
    settings = router_settings(docs)
    plan = _plan(settings)
    if plan is None:
        return []  # a size that does not parse: kvray's loader names it (validate.py)
    cluster = service["spec"]["rayClusterConfig"]
    groups = cluster.get("workerGroupSpecs") or []
    tp, pp, max_replicas = plan
    try:
        bundle = rank_bundle(settings, groups)
    except (TypeError, ValueError):
        return []  # kvray's loader names the setting (validate.py)
    errors = check_stage_fits(service, groups, bundle, tp, pp, max_replicas)
    if tp > 1 and bundle.get("GPU", 0) > 0:
        errors += check_shared_memory(service, groups, bundle, tp)
    if pp > 1:
        errors += check_pod_to_pod(docs, service, groups)
    return errors


def _plan(settings: dict[str, Any]) -> tuple[int, int, int] | None:
    """(tensor_parallel_size, pipeline_parallel_size, max_replicas) as the router reads them."""
    try:
        tp = int(settings.get("tensor_parallel_size", 1))
        pp = int(settings.get("pipeline_parallel_size", 1))
        replicas = int(settings.get("replicas", 1))
        max_replicas = int(settings.get("max_replicas") or replicas)
    except (TypeError, ValueError):
        return None
    return (tp, pp, max_replicas) if tp >= 1 and pp >= 1 else None


def rank_bundle(settings: dict[str, Any], groups: list[Doc]) -> dict[str, float]:
    """What one rank asks Ray for, as `worker_actor.actor_options` decides it: its CPUs, and a
    GPU when the cluster has GPUs unless gpus_per_replica says otherwise (none for `fake`)."""
    cpus = float(settings.get("cpus_per_replica", 1.0))
    gpus = settings.get("gpus_per_replica")
    if gpus is None:
        has_gpus = any(pod_resources(g).get("GPU", 0) >= 1 for g in groups)
        gpus = 1.0 if has_gpus else 0.0
    if settings.get("model") == "fake":
        gpus = 0.0
    bundle = {"CPU": cpus, "GPU": float(gpus)}
    return {k: v for k, v in bundle.items() if v > 0}


def pod_resources(group: Doc) -> dict[str, float]:
    """The Ray resources of a worker group's pod, as KubeRay starts Ray there: num-cpus and
    num-gpus from rayStartParams, else from the Ray container's limits (else requests); CPUs
    rounded up, GPUs from `*/gpu`."""
    params = group.get("rayStartParams") or {}
    container = group["template"]["spec"]["containers"][0]
    resources = container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    cpu = params.get("num-cpus", limits.get("cpu", requests.get("cpu")))
    gpu = params.get("num-gpus")
    if gpu is None:
        gpus = {k: v for k, v in (limits or requests).items() if k.endswith("/gpu")}
        gpu = sum(float(v) for v in gpus.values())
    return {"CPU": _cpus(cpu), "GPU": float(gpu)}


def _cpus(value: Any) -> float:
    match = CPU_QUANTITY.match(str(value)) if value is not None else None
    if match is None:
        return 0.0  # no CPUs given (or not a quantity: invariants.py names it)
    number = float(match.group(1)) / (1000 if match.group(2) else 1)
    return float(math.ceil(number))


def stages_per_pod(resources: dict[str, float], stage: dict[str, float]) -> int:
    return min((int(resources.get(k, 0) // v) for k, v in stage.items()), default=0)


def check_stage_fits(
    service: Doc,
    groups: list[Doc],
    bundle: dict[str, float],
    tp: int,
    pp: int,
    max_replicas: int,
) -> list[str]:
    """A stage's tp ranks fit one worker pod, and the worker groups' maxReplicas pods hold
    max_replicas replicas of pp stages each."""
    stage = {k: tp * v for k, v in bundle.items()}
    if not stage:
        return []  # a rank that asks for nothing: worker_actor refuses it at start
    at = f"{_name(service)}: spec.rayClusterConfig.workerGroupSpecs"
    fits = [stages_per_pod(pod_resources(g), stage) for g in groups]
    if not any(fits):
        largest = [pod_resources(g) for g in groups]
        return [
            f"{at}: a replica's {tp} tensor-parallel rank(s) of {bundle} (cpus_per_replica / "
            f"gpus_per_replica each) need {stage} on one Ray node, and a worker pod is one: no "
            f"worker group's pod has that (they have {largest}); Ray would never place them"
        ]
    held = sum(n * g.get("maxReplicas", 2**31 - 1) for n, g in zip(fits, groups))
    needed = max_replicas * pp
    if held < needed:
        return [
            f"{at}: max_replicas {max_replicas} x pipeline_parallel_size {pp} = {needed} stages "
            f"of {stage}, but the worker groups' maxReplicas pods hold {held}: the replicas past "
            "it would wait for pods the autoscaler may not add"
        ]
    return []


def check_shared_memory(
    service: Doc, groups: list[Doc], bundle: dict[str, float], tp: int
) -> list[str]:
    """Ranks on GPUs that share a pod talk through NCCL, whose shared-memory transport needs a
    real /dev/shm (a container's default is 64 MiB)."""
    stage = {k: tp * v for k, v in bundle.items()}
    errors = []
    for i, group in enumerate(groups):
        if not stages_per_pod(pod_resources(group), stage):
            continue  # no stage runs on this group's pods
        spec = group["template"]["spec"]
        memory_volumes = {
            v["name"]
            for v in spec.get("volumes", [])
            if (v.get("emptyDir") or {}).get("medium") == "Memory"
        }
        mounts = spec["containers"][0].get("volumeMounts", [])
        if not any(m["mountPath"] == "/dev/shm" and m["name"] in memory_volumes for m in mounts):
            errors.append(
                f"{_name(service)}: spec.rayClusterConfig.workerGroupSpecs[{i}].template.spec: "
                f"{tp} tensor-parallel ranks on GPUs share this pod through NCCL, which needs "
                "/dev/shm: mount an emptyDir with medium: Memory at /dev/shm in containers[0]"
            )
    return errors


def check_pod_to_pod(docs: list[Doc], service: Doc, groups: list[Doc]) -> list[str]:
    """Pipeline stages on different pods connect on ports NCCL and gloo pick at run time: every
    NetworkPolicy over the worker pods must let the worker pods in on every port."""
    errors = []
    for i, group in enumerate(groups):
        labels = group["template"].get("metadata", {}).get("labels", {})
        for policy in docs:
            if not _guards(policy, labels):
                continue
            rules = policy["spec"].get("ingress", [])
            if not any(_lets_in_on_every_port(rule, labels) for rule in rules):
                errors.append(
                    f"{_name(policy)}: spec.ingress lets workerGroupSpecs[{i}]'s pods reach "
                    "each other only on some ports; pipeline stages on different pods connect "
                    "on ports NCCL picks at run time (a rule from those pods, with no ports)"
                )
    return errors


def _guards(policy: Doc, labels: dict[str, str]) -> bool:
    return (
        policy.get("kind") == "NetworkPolicy"
        and selects(policy["spec"].get("podSelector", {}), labels)
        and "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
    )


def _lets_in_on_every_port(rule: Doc, labels: dict[str, str]) -> bool:
    if rule.get("ports"):
        return False
    peers = rule.get("from")
    if not peers:
        return True  # from anyone
    return any(
        "podSelector" in peer
        and not (peer.get("namespaceSelector") or {}).get("matchLabels")
        and selects(peer["podSelector"], labels)
        for peer in peers
    )
