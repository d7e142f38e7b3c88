"""kvray as the Ray Serve application KubeRay deploys (kvray.cluster.serve_app:app): it serves gRPC
from inside its Serve replica and answers Serve's HTTP route and health checks."""

from __future__ import annotations

import json
import urllib.request

import pytest

from kvray.client import KvrayClient
from tests.helpers import free_port

pytestmark = pytest.mark.ray


def test_serve_application_serves_grpc_and_status(ray_session, model_cache_dir, tmp_path):
    from ray import serve

    from kvray.cluster.serve_app import app

    port, http_port, kvray_http_port = free_port(), free_port(), free_port()
    config = tmp_path / "kvray.yaml"
    config.write_text(
        f"model: tiny\nhost: 127.0.0.1\nport: {port}\nhttp_port: {kvray_http_port}\n"
        f"max_model_len: 256\ncache_dir: {model_cache_dir}\n"
    )
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    try:
        serve.run(app({"config": str(config)}), name="kvray", route_prefix="/kvray")
        with KvrayClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(timeout=120)
            result = client.generate("Hello", temperature=0, max_tokens=6, ignore_eos=True)
            assert len(result.token_ids) == 6
        models = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{kvray_http_port}/v1/models").read()
        )  # the OpenAI API, served by the same router inside its Serve replica
        assert models["data"][0]["id"] == "tiny"
        status = serve.status().applications["kvray"]
        assert status.status == "RUNNING"
        proxy_port = serve.context._get_global_client().http_config.port
        body = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{proxy_port}/kvray", timeout=30).read()
        )
        assert (
            body["replicas"][0]["state"] == "READY"
            and body["replicas"][0]["num_finished_requests"] == 1
        )
    finally:
        serve.shutdown()


def test_bad_settings_fail_the_build_with_the_key_named():
    from kvray.cluster.serve_app import app

    with pytest.raises(ValueError, match="unknown config key"):
        app({"model": "tiny", "replica": 2})


def test_http_on_serves_proxy_port_is_refused_with_a_way_out():
    from kvray.cluster.serve_app import app

    with pytest.raises(ValueError, match="http_port 8000 is Ray Serve's own HTTP proxy port"):
        app({"model": "tiny"})  # 8000 is the default
