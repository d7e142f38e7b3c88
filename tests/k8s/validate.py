"""Offline validation of kvray's Kubernetes manifests, as close to an API server as this machine
allows: render each overlay with kustomize, validate core kinds with kubernetes-validate
(strict), validate RayService against KubeRay's CRD schema (defaults applied, nulls dropped,
unknown fields rejected), validate the Serve config with Ray's schema, and check the invariants
the operator or the running cluster would trip over. Every error names the resource and field.

    python -m tests.k8s.validate k8s/overlays/cpu-dev k8s/overlays/gpu
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
# KubeRay v1.7.0's CRDs, unchanged: beside the project (as CI has them), or where the variable says.
CRD_DIR = Path(
    os.environ.get("KVRAY_KUBERAY_CRDS", ROOT.parent / "shared" / "k8s" / "kuberay-crds-v1.7.0")
)
K8S_VERSION = "1.33.0"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$")

Doc = dict[str, Any]


def render(overlay: Path) -> list[Doc]:
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True)
    if out.returncode != 0:
        raise ValueError(f"{overlay}: kustomize failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate(docs: list[Doc]) -> list[str]:
    """Every problem found, as 'Kind/name: field: message'. Empty means valid."""
    errors: list[str] = []
    for doc in docs:
        errors += check_core(doc) if doc.get("apiVersion", "").count("ray.io") == 0 else []
        if doc.get("kind") in ("RayService", "RayCluster"):
            errors += check_crd(doc)
        if doc.get("kind") == "RayService":
            errors += check_serve_config(doc, docs)
    errors += check_invariants(docs)
    return errors


def _name(doc: Doc) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# ---------------------------------------------------------------------- core kinds


def check_core(doc: Doc) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path) or "(root)"
        return [f"{_name(doc)}: {path}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [f"{_name(doc)}: no schema for {doc.get('apiVersion')}/{doc.get('kind')}: {err}"]
    return []


# ---------------------------------------------------------------------- CRDs


@cache
def crd_schema(kind: str) -> Doc:
    path = CRD_DIR / f"ray.io_{kind.lower()}s.yaml"
    crd = yaml.safe_load(path.read_text())  # a missing file is an error, not a skip
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return version["schema"]["openAPIV3Schema"]


def check_crd(doc: Doc) -> list[str]:
    import jsonschema

    schema = crd_schema(doc["kind"])
    obj = apply_defaults(drop_nulls(copy.deepcopy(doc), schema), schema)
    validator = jsonschema.Draft7Validator(api_server_schema(schema))
    return [
        f"{_name(doc)}: {'.'.join(str(p) for p in err.absolute_path) or '(root)'}: {err.message}"
        for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    ]


def api_server_schema(schema: Any) -> Any:
    """An OpenAPI v3 structural schema as a JSON schema that rejects what the API server would:
    unknown fields (unless preserved) and int-or-string values of other types."""
    if isinstance(schema, list):
        return [api_server_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: api_server_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        schema.get("type") == "object"
        and "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if schema.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"]
    return out


def drop_nulls(obj: Any, schema: Doc) -> Any:
    """Remove nulls the schema does not allow, as the API server does."""
    if isinstance(obj, dict):
        props = schema.get("properties", {})
        extra = (
            schema.get("additionalProperties")
            if isinstance(schema.get("additionalProperties"), dict)
            else {}
        )
        for key in list(obj):
            sub = props.get(key, extra)
            if obj[key] is None and not sub.get("nullable"):
                del obj[key]
            else:
                obj[key] = drop_nulls(obj[key], sub)
    elif isinstance(obj, list):
        return [drop_nulls(o, schema.get("items", {})) for o in obj]
    return obj


def apply_defaults(obj: Any, schema: Doc) -> Any:
    """Fill schema defaults into missing fields of objects that are present."""
    if isinstance(obj, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                obj[key] = apply_defaults(obj[key], sub)
    elif isinstance(obj, list):
        return [apply_defaults(o, schema.get("items", {})) for o in obj]
    return obj


# ---------------------------------------------------------------------- Serve config


def check_serve_config(doc: Doc, docs: list[Doc]) -> list[str]:
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    where = f"{_name(doc)}: spec.serveConfigV2"
    try:
        config = yaml.safe_load(doc["spec"]["serveConfigV2"])
        ServeDeploySchema.model_validate(config)
    except Exception as err:
        return [f"{where}: {err}"]
    errors = [
        f"{where}: unknown key {k!r}" for k in set(config) - set(ServeDeploySchema.model_fields)
    ]
    for i, application in enumerate(config.get("applications", [])):
        at = f"{where}.applications[{i}]"
        errors += [
            f"{at}: unknown key {k!r}"
            for k in set(application) - set(ServeApplicationSchema.model_fields)
        ]
        errors += check_import_path(at, application.get("import_path", ""))
        errors += check_app_args(at, application.get("args") or {}, docs)
    return errors


def check_import_path(at: str, import_path: str) -> list[str]:
    module, _, attr = import_path.partition(":")
    try:
        target = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        return [f"{at}.import_path: {import_path!r} does not import: {err}"]
    return [] if callable(target) else [f"{at}.import_path: {import_path!r} is not callable"]


def check_app_args(at: str, args: Doc, docs: list[Doc]) -> list[str]:
    """The app's args, with its config file taken from the mounted ConfigMap, must load."""
    from kvray.cluster.config import load

    settings = dict(args)
    path = settings.pop("config", None)
    try:
        if path is not None:
            text = configmap_file(docs, path)
            if text is None:
                return [f"{at}.args.config: {path} is not a file of a mounted ConfigMap"]
            settings = {**yaml.safe_load(text), **settings}
        load(settings, environ={})
    except ValueError as err:
        return [f"{at}.args: {err}"]
    return []


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
    errors += check_grpc_service(docs, service, cluster)
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


def check_grpc_service(docs: list[Doc], service: Doc, cluster: Doc) -> list[str]:
    """The gRPC Service selects the head pod and reaches the port the router listens on."""
    errors = []
    grpc_service = next(
        (
            d
            for d in docs
            if d.get("kind") == "Service"
            and any(p.get("name") == "grpc" for p in d["spec"].get("ports", []))
        ),
        None,
    )
    if grpc_service is None:
        return [f"{_name(service)}: no Service exposes a port named grpc"]
    at = _name(grpc_service)
    head = cluster["headGroupSpec"]["template"]
    labels = head.get("metadata", {}).get("labels", {})
    selector = grpc_service["spec"].get("selector", {})
    if not selector or any(labels.get(k) != v for k, v in selector.items()):
        errors.append(f"{at}: spec.selector {selector} does not match the head pod labels {labels}")
    container = head["spec"]["containers"][0]
    ports = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    for p in grpc_service["spec"]["ports"]:
        if p.get("name") != "grpc":
            continue
        target = p.get("targetPort", p["port"])
        number = ports.get(target) if isinstance(target, str) else target
        if number is None:
            errors.append(
                f"{at}: spec.ports[grpc].targetPort {target!r} is no port of the head container"
            )
        elif number != router_port(docs):
            errors.append(
                f"{at}: spec.ports[grpc].targetPort resolves to {number}, the router listens on {router_port(docs)}"
            )
        if p.get("appProtocol") != "kubernetes.io/h2c":
            errors.append(f"{at}: spec.ports[grpc].appProtocol must be kubernetes.io/h2c")
    for probe in ("readinessProbe", "livenessProbe"):
        grpc_probe = (container.get(probe) or {}).get("grpc")
        if grpc_probe is None:
            errors.append(
                f"{_name(service)}: head container {probe}: must be a grpc.health.v1 probe"
            )
        elif grpc_probe.get("port") != router_port(docs):
            errors.append(
                f"{_name(service)}: head container {probe}.grpc.port {grpc_probe.get('port')} is not the router's port"
            )
    return errors


def router_port(docs: list[Doc]) -> int | None:
    service = ray_head(docs)
    if service is None:
        return None
    args = (yaml.safe_load(service["spec"]["serveConfigV2"]).get("applications") or [{}])[0].get(
        "args"
    ) or {}
    text = configmap_file(docs, args.get("config", "")) if "config" in args else None
    settings = {**(yaml.safe_load(text) if text else {}), **args}
    return int(settings.get("port", 50051))


def main(argv: list[str]) -> int:
    failed = False
    for overlay in argv or ["k8s/overlays/cpu-dev", "k8s/overlays/gpu"]:
        errors = validate(render(Path(overlay)))
        failed |= bool(errors)
        print(f"{overlay}: {'ok' if not errors else f'{len(errors)} error(s)'}")
        for e in errors:
            print(f"  {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
