"""Offline validation of kvray's Kubernetes manifests, as close to an API server as this machine
allows: render each overlay with kustomize, validate core kinds with kubernetes-validate
(strict), validate RayService against KubeRay's CRD schema (defaults applied, nulls dropped,
unknown fields rejected), validate the Serve config with Ray's schema, and check the invariants
the operator or the running cluster would trip over. Every error names the resource and field.

    python -m tests.k8s.validate k8s/overlays/cpu-dev k8s/overlays/gpu k8s/overlays/gpu-tp
"""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.k8s.invariants import Doc, check_invariants, configmap_file, ray_head
from tests.k8s.rank_groups import check_rank_groups

ROOT = Path(__file__).resolve().parents[2]
# KubeRay v1.7.0's CRDs, vendored unchanged beside this file, or where the variable says.
CRD_DIR = Path(
    os.environ.get("KVRAY_KUBERAY_CRDS", Path(__file__).resolve().parent / "kuberay-crds-v1.7.0")
)
K8S_VERSION = "1.33.0"
OVERLAYS = ["cpu-dev", "gpu", "gpu-tp"]  # and gpu-pp where kvray has pipeline stages


def has_pipeline_stages() -> bool:
    """Whether this kvray runs pipeline_parallel_size 2 (a version without pipeline stages
    refuses it at load, and so refuses gpu-pp's config)."""
    from kvray.workers.config import WorkerConfig

    try:
        WorkerConfig(pipeline_parallel_size=2)
    except ValueError:
        return False
    return True


def render(overlay: Path) -> list[Doc]:
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True)
    if out.returncode != 0:
        raise ValueError(f"{overlay}: kustomize failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def render_named(name: str, folder: Path) -> list[Doc]:
    """`overlay` (a folder of k8s/overlays), or `overlay+component`: the overlay with a folder
    of k8s/components added, as a user's own kustomization in `folder` would add it."""
    overlay, _, component = name.partition("+")
    k8s = ROOT / "k8s"
    if not component:
        return render(k8s / "overlays" / overlay)
    kustomization = {  # kustomize takes relative paths only
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(k8s / "overlays" / overlay, folder)],
        "components": [os.path.relpath(k8s / "components" / component, folder)],
    }
    (folder / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(folder)


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
    errors += check_rank_groups(docs)
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
        load(settings, environ=head_environ(docs))
    except ValueError as err:
        return [f"{at}.args: {err}"]
    return []


def head_environ(docs: list[Doc]) -> dict[str, str]:
    """The head container's KVRAY_* variables, which the router reads over its config file."""
    service = ray_head(docs)
    if service is None:
        return {}
    container = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0]
    return {
        e["name"]: str(e.get("value", ""))
        for e in container.get("env", [])
        if e.get("name", "").startswith("KVRAY_")
    }


def main(argv: list[str]) -> int:
    failed = False
    names = OVERLAYS + (["gpu-pp"] if has_pipeline_stages() else [])
    for overlay in argv or [f"k8s/overlays/{name}" for name in names]:
        errors = validate(render(Path(overlay)))
        failed |= bool(errors)
        print(f"{overlay}: {'ok' if not errors else f'{len(errors)} error(s)'}")
        for e in errors:
            print(f"  {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
