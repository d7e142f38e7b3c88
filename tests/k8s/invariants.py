"""Invariants of kvray's rendered manifests that no schema checks: the operator or the running
cluster would trip over them. Every error names the resource and field."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$")
SERVE_PROXY_PORT = 8000  # Ray Serve's HTTP proxy on the head pod
RAY_PORTS = {6379: "GCS", 8265: "dashboard", 10001: "Ray client", 52365: "dashboard agent"}
STOP_SLACK_S = 15  # grace beyond the drain: gRPC's margin (5 s) and Ray's own stop

Doc = dict[str, Any]


def _name(doc: Doc) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def configmap_file(docs: list[Doc], path: str) -> str | None:
    """The text of `path` if a ConfigMap mounted on the head container provides it."""
    head = ray_head(docs)
    if head is None:
        return None
    pod = head["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in pod["containers"][0].get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        cm = volumes.get(mount["name"], {}).get("configMap")
        if cm and path.startswith(prefix):
            data = find(docs, "ConfigMap", cm["name"])
            return None if data is None else data.get("data", {}).get(path[len(prefix) :])
    return None


# ---------------------------------------------------------------------- invariants


def find(docs: list[Doc], kind: str, name: str) -> Doc | None:
    return next((d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name), None)


def ray_head(docs: list[Doc]) -> Doc | None:
    return next((d for d in docs if d.get("kind") == "RayService"), None)


def check_invariants(docs: list[Doc]) -> list[str]:
    errors = []
    for doc in docs:
        name = doc.get("metadata", {}).get("name", "")
        if not DNS_1035.match(name) or len(name) > 63:
            errors.append(f"{_name(doc)}: metadata.name: {name!r} is not a DNS-1035 label")
    service = ray_head(docs)
    if service is None:
        return [*errors, "no RayService in the rendered manifests"]
    cluster = service["spec"]["rayClusterConfig"]
    errors += check_ray_version(service, cluster)
    errors += check_groups(service, cluster)
    errors += check_pods(service, cluster)
    errors += check_router_services(docs, service, cluster)
    errors += check_metrics_scrape(docs, service, cluster)
    errors += check_control_plane(docs, service, cluster)
    errors += check_drain(docs, service, cluster)
    errors += check_mounted_files(docs, service, cluster)
    return errors


def check_ray_version(service: Doc, cluster: Doc) -> list[str]:
    pinned = pinned_ray_version()
    if cluster.get("rayVersion") != pinned:
        return [
            f"{_name(service)}: spec.rayClusterConfig.rayVersion: {cluster.get('rayVersion')!r} "
            f"differs from the ray[serve]=={pinned} that kvray pins"
        ]
    return []


def pinned_ray_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"ray\[serve\]==([^"]+)"', text)
    assert match, "pyproject.toml must pin ray[serve]==X.Y.Z"
    return match.group(1)


def pod_specs(cluster: Doc) -> Iterator[tuple[str, Doc]]:
    yield "spec.rayClusterConfig.headGroupSpec", cluster["headGroupSpec"]["template"]["spec"]
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        yield f"spec.rayClusterConfig.workerGroupSpecs[{i}]", group["template"]["spec"]


def check_groups(service: Doc, cluster: Doc) -> list[str]:
    errors = []
    for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
        at = f"{_name(service)}: spec.rayClusterConfig.workerGroupSpecs[{i}]"
        low, high, n = (
            group.get("minReplicas", 0),
            group.get("maxReplicas", 2**31 - 1),
            group.get("replicas", 0),
        )
        if not low <= n <= high:
            errors.append(
                f"{at}: need minReplicas <= replicas <= maxReplicas, got {low} <= {n} <= {high}"
            )
        if not DNS_1035.match(group.get("groupName", "")):
            errors.append(f"{at}.groupName: {group.get('groupName')!r} is not a DNS-1035 label")
    for at, pod in pod_specs(cluster):
        for c, container in enumerate(pod["containers"]):
            errors += check_resources(
                f"{_name(service)}: {at}.template.spec.containers[{c}]", container
            )
    return errors


def check_resources(at: str, container: Doc) -> list[str]:
    errors = []
    resources = container.get("resources", {})
    for section in ("requests", "limits"):
        for key, value in (resources.get(section) or {}).items():
            if not QUANTITY.match(str(value)):
                errors.append(f"{at}.resources.{section}.{key}: {value!r} is not a quantity")
    requests, limits = resources.get("requests") or {}, resources.get("limits") or {}
    for key in set(requests) | set(limits):
        if key.endswith("/gpu") and str(requests.get(key)) != str(limits.get(key)):
            errors.append(
                f"{at}.resources: {key} requests ({requests.get(key)}) must equal limits ({limits.get(key)})"
            )
    return errors


def check_pods(service: Doc, cluster: Doc) -> list[str]:
    """No service-link variables: Kubernetes would inject KVRAY_* ones for kvray-* Services."""
    return [
        f"{_name(service)}: {at}.template.spec.enableServiceLinks must be false (service links "
        "set KVRAY_* variables)"
        for at, pod in pod_specs(cluster)
        if pod.get("enableServiceLinks") is not False
    ]


def check_router_services(docs: list[Doc], service: Doc, cluster: Doc) -> list[str]:
    """The gRPC and HTTP Services select the head pod and reach the ports the router listens
    on; the probes speak grpc.health.v1 on the router's port."""
    settings = router_settings(docs)
    grpc_port, http_port = int(settings.get("port", 50051)), int(settings.get("http_port", 8000))
    tls = uses_tls(settings)
    grpc_protocol, http_protocol = ("https", "https") if tls else ("kubernetes.io/h2c", "http")
    errors = check_service_port(docs, service, cluster, "grpc", grpc_port, grpc_protocol)
    errors += check_service_port(docs, service, cluster, "http", http_port, http_protocol)
    if http_port == SERVE_PROXY_PORT:
        errors.append(
            f"{_name(service)}: kvray http_port {http_port} is Ray Serve's HTTP proxy port on "
            "the head pod; pick another (the manifests use 8080)"
        )
    container = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    health = str(settings.get("health_port") or "")
    health_port = int(health) if health.isdigit() else None  # not a number: validate.py says so
    if tls and not health:
        errors.append(
            f"{_name(service)}: kvray speaks TLS but has no health_port: Kubernetes' gRPC "
            "probes speak plaintext, so they need the plaintext health port"
        )
    # With TLS the router's own port cannot answer a plaintext probe: health_port only.
    probe_ports = {health_port} if tls and health_port else {grpc_port}
    if health_port and not tls:
        probe_ports.add(health_port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = (container.get(probe) or {}).get("grpc")
        if grpc_probe is None:
            errors.append(
                f"{_name(service)}: head container {probe}: must be a grpc.health.v1 probe"
            )
        elif grpc_probe.get("port") not in probe_ports:
            errors.append(
                f"{_name(service)}: head container {probe}.grpc.port {grpc_probe.get('port')} "
                f"is not a port that answers it ({', '.join(map(str, sorted(probe_ports)))})"
            )
    return errors


def check_service_port(
    docs: list[Doc], service: Doc, cluster: Doc, name: str, port: int, app_protocol: str
) -> list[str]:
    """A Service with a port called `name` selects the head pod and reaches `port` there."""
    exposing = next(
        (
            d
            for d in docs
            if d.get("kind") == "Service"
            and any(p.get("name") == name for p in d["spec"].get("ports", []))
        ),
        None,
    )
    if exposing is None:
        return [f"{_name(service)}: no Service exposes a port named {name}"]
    errors = []
    at = _name(exposing)
    head = cluster["headGroupSpec"]["template"]
    labels = head.get("metadata", {}).get("labels", {})
    selector = exposing["spec"].get("selector", {})
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        errors.append(f"{at}: spec.selector {selector} does not match the head pod labels {labels}")
    ports = {
        p.get("name"): p["containerPort"] for p in head["spec"]["containers"][0].get("ports", [])
    }
    for p in exposing["spec"]["ports"]:
        if p.get("name") != name:
            continue
        target = p.get("targetPort", p["port"])
        number = ports.get(target) if isinstance(target, str) else target
        if number is None:
            errors.append(
                f"{at}: spec.ports[{name}].targetPort {target!r} is no port of the head container"
            )
        elif number != port:
            errors.append(
                f"{at}: spec.ports[{name}].targetPort resolves to {number}, the router listens on {port}"
            )
        if p.get("appProtocol") != app_protocol:
            errors.append(f"{at}: spec.ports[{name}].appProtocol must be {app_protocol}")
    return errors


def check_metrics_scrape(docs: list[Doc], service: Doc, cluster: Doc) -> list[str]:
    """Prometheus' pod annotations point at the router's /metrics."""
    http_port = int(router_settings(docs).get("http_port", 8000))
    annotations = cluster["headGroupSpec"]["template"].get("metadata", {}).get("annotations", {})
    at = f"{_name(service)}: headGroupSpec.template.metadata.annotations"
    want = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(http_port),
        "prometheus.io/path": "/metrics",
    }
    if uses_tls(router_settings(docs)):
        want["prometheus.io/scheme"] = "https"
    return [
        f"{at}[{key}]: {annotations.get(key)!r}, expected {value!r}"
        for key, value in want.items()
        if annotations.get(key) != value
    ]


def router_settings(docs: list[Doc]) -> dict[str, Any]:
    """The kvray settings the Serve application starts with (its config file, the head
    container's KVRAY_* variables, then its args)."""
    service = ray_head(docs)
    if service is None:
        return {}
    applications = yaml.safe_load(service["spec"]["serveConfigV2"]).get("applications") or [{}]
    args = applications[0].get("args") or {}
    text = configmap_file(docs, args.get("config", "")) if "config" in args else None
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    environ = {  # KVRAY_* on the head container: over the file, under the args
        e["name"].removeprefix("KVRAY_").lower(): e.get("value")
        for e in head["containers"][0].get("env", [])
        if e.get("name", "").startswith("KVRAY_") and e["name"] != "KVRAY_CONFIG"
    }
    return {**(yaml.safe_load(text) if text else {}), **environ, **args}


def uses_tls(settings: dict[str, Any]) -> bool:
    return bool(settings.get("tls_cert_file"))


def check_control_plane(docs: list[Doc], service: Doc, cluster: Doc) -> list[str]:
    """Ray's ports (a job submitted there runs code) need Ray's token and answer only the
    cluster's own pods (and the KubeRay operator)."""
    errors = []
    if (cluster.get("authOptions") or {}).get("mode") != "token":
        errors.append(
            f"{_name(service)}: spec.rayClusterConfig.authOptions.mode must be token (Ray's "
            "dashboard and GCS run submitted jobs: anyone who reaches them can run code)"
        )
    head_labels = cluster["headGroupSpec"]["template"].get("metadata", {}).get("labels", {})
    policies = [
        d
        for d in docs
        if d.get("kind") == "NetworkPolicy"
        and selects(d["spec"].get("podSelector", {}), head_labels)
        and "Ingress" in d["spec"].get("policyTypes", ["Ingress"])
    ]
    if not policies:
        return [*errors, f"{_name(service)}: no NetworkPolicy guards the head pod's Ray ports"]
    for policy in policies:
        for i, rule in enumerate(policy["spec"].get("ingress", [])):
            if rule.get("from"):
                continue  # from chosen peers only
            ports = {p.get("port") for p in rule.get("ports", [])}
            opened = sorted(RAY_PORTS) if not ports else sorted(ports & set(RAY_PORTS))
            for port in opened:
                errors.append(
                    f"{_name(policy)}: spec.ingress[{i}] opens port {port} ({RAY_PORTS[port]}) "
                    "to every peer; Ray's ports must answer only the cluster's pods"
                )
    return errors


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    wanted = selector.get("matchLabels", {})
    return all(labels.get(k) == v for k, v in wanted.items())


def check_drain(docs: list[Doc], service: Doc, cluster: Doc) -> list[str]:
    """The head pod drains the router before it stops (preStop `kvray drain` on its HTTP port),
    and Kubernetes waits long enough for the drain."""
    settings = router_settings(docs)
    drain_s = float(settings.get("shutdown_timeout_s", 30))
    pod = cluster["headGroupSpec"]["template"]["spec"]
    at = f"{_name(service)}: headGroupSpec.template.spec"
    errors = []
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if grace < drain_s + STOP_SLACK_S:
        errors.append(
            f"{at}.terminationGracePeriodSeconds {grace} is shorter than the drain "
            f"(shutdown_timeout_s {drain_s:g} + {STOP_SLACK_S} s): Kubernetes would kill the "
            "router mid-drain"
        )
    command = (pod["containers"][0].get("lifecycle", {}).get("preStop", {}).get("exec") or {}).get(
        "command", []
    )
    http_port = str(settings.get("http_port", 8000))
    tls = " --tls" if uses_tls(settings) else ""
    if (
        command[:2] != ["kvray", "drain"]
        or http_port not in command
        or (tls and "--tls" not in command)
    ):
        errors.append(
            f"{at}.containers[0].lifecycle.preStop must run `kvray drain --http-port {http_port}{tls}` "
            f"(got {command})"
        )
    return errors


FILE_SETTINGS = ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_token_file")


def check_mounted_files(docs: list[Doc], service: Doc, cluster: Doc) -> list[str]:
    """The certificate, key and token files kvray is told to read are in volumes the head
    container mounts whole: a subPath mount never sees a rotated Secret."""
    settings = router_settings(docs)
    container = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    mounts = container.get("volumeMounts", [])
    errors = []
    for key in FILE_SETTINGS:
        path = settings.get(key)
        if not path:
            continue
        holding = [m for m in mounts if _inside(str(path), m["mountPath"])]
        mount = max(holding, key=lambda m: len(m["mountPath"]), default=None)  # the innermost
        if mount is None:
            errors.append(
                f"{_name(service)}: kvray {key} {path} is in no volume the head container mounts"
            )
        elif mount.get("subPath"):
            errors.append(
                f"{_name(service)}: head container volumeMounts[{mount['name']}] uses subPath: "
                f"{key} would never see a rotated Secret; mount the folder"
            )
    return errors


def _inside(path: str, mount_path: str) -> bool:
    return path == mount_path or path.startswith(mount_path.rstrip("/") + "/")
