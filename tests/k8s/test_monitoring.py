"""k8s/monitoring: the Grafana dashboard renders as a ConfigMap Grafana picks up, and every
metric its queries read is one that kvray's /metrics exposes."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from kvray.cluster.metrics import ServingMetrics
from kvray.cluster.stats import ClusterStats, ReplicaState, ReplicaStats
from tests.k8s import validate as v

MONITORING = v.ROOT / "k8s" / "monitoring"

pytestmark = pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is a dev dependency"
)


def exposed_series() -> set[str]:
    """Every series name a router's /metrics has (histograms with their _bucket/_sum/_count)."""
    status = ClusterStats(
        replicas=[ReplicaStats("replica-0", ReplicaState.READY, kv_blocks_total=8)],
        queue_depth=0, num_running=0, num_moved_requests=0, num_rebalanced_requests=0,
        min_replicas=1, max_replicas=1, target_replicas=1,
    )  # fmt: skip
    text = ServingMetrics("m", lambda: status).render().decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_dashboard_renders_as_a_configmap_for_grafana():
    (doc,) = v.render(MONITORING)
    assert v.validate([doc]) == ["no RayService in the rendered manifests"]  # core kinds are fine
    assert doc["kind"] == "ConfigMap" and doc["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(doc["data"]["grafana-dashboard.json"])
    assert dashboard["uid"] == "kvray-serving" and len(dashboard["panels"]) >= 8


def test_every_dashboard_query_reads_a_metric_kvray_exposes():
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for q in queries for name in re.findall(r"\b((?:vllm|kvray):\w+)", q)}
    missing = used - exposed_series()
    assert not missing, f"the dashboard reads metrics kvray does not expose: {missing}"
    assert "vllm:time_to_first_token_seconds_bucket" in used


def test_the_scrape_job_keeps_the_router_pod():
    job = yaml.safe_load((MONITORING / "prometheus-scrape-config.yaml").read_text())
    keep = job["scrape_configs"][0]["relabel_configs"][0]
    head = v.render(v.ROOT / "k8s" / "overlays" / "cpu-dev")
    annotations = next(d for d in head if d["kind"] == "RayService")["spec"]["rayClusterConfig"][
        "headGroupSpec"
    ]["template"]["metadata"]["annotations"]
    assert keep["action"] == "keep"
    assert re.fullmatch(keep["regex"], annotations["prometheus.io/scrape"])


def test_the_scrape_job_speaks_https_to_a_router_with_tls(tmp_path):
    job = yaml.safe_load((MONITORING / "prometheus-scrape-config.yaml").read_text())
    (rule,) = [
        r
        for r in job["scrape_configs"][0]["relabel_configs"]
        if r.get("target_label") == "__scheme__"
    ]
    docs = v.render_named("cpu-dev+tls", tmp_path)
    annotations = next(d for d in docs if d["kind"] == "RayService")["spec"]["rayClusterConfig"][
        "headGroupSpec"
    ]["template"]["metadata"]["annotations"]
    annotation = rule["source_labels"][0].removeprefix("__meta_kubernetes_pod_annotation_")
    value = annotations[annotation.replace("prometheus_io_", "prometheus.io/")]
    assert value == "https" and re.fullmatch(rule["regex"], value)
