"""The config loader: precedence (defaults < YAML < KVRAY_* env < flags) and clear errors."""

from __future__ import annotations

import pytest

from kvray.cluster.config import ClusterConfig, load


def test_defaults():
    config = load({}, environ={})
    assert config == ClusterConfig()
    assert config.model == "tiny" and config.port == 50051


def test_yaml_then_env_then_flags(tmp_path):
    path = tmp_path / "kvray.yaml"
    path.write_text("model: tiny-qwen2\nreplicas: 3\nmax-num-seqs: 8\nport: 6000\n")
    env = {"KVRAY_REPLICAS": "4", "KVRAY_DTYPE": "float32", "KVRAY_ENABLE_PREFIX_CACHING": "false"}
    config = load({"port": 7000, "model": None}, config_file=path, environ=env)
    assert config.model == "tiny-qwen2"  # YAML (the None flag is "not given")
    assert config.replicas == 4  # env over YAML
    assert config.port == 7000  # flag over YAML
    assert config.engine.scheduler.max_num_seqs == 8  # one field, read by worker and scheduler
    assert config.engine.worker.dtype == "float32"
    assert config.engine.scheduler.enable_prefix_caching is False


def test_config_file_from_environment(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("replicas: 2\n")
    assert load({}, environ={"KVRAY_CONFIG": str(path)}).replicas == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"flags": {"replica": 2}}, "unknown config key(s) replica"),
        ({"environ": {"KVRAY_REPLICAS": "two"}}, "KVRAY_REPLICAS='two' is not a valid int"),
        ({"flags": {"replicas": 0}}, "replicas must be >= 1"),
        ({"flags": {"block_size": 3}}, "block_size must be a power of two"),
        ({"flags": {"max_connections": 0}}, "max_connections >= 1, got 30.0 and 0"),
        ({"flags": {"http_read_timeout_s": 0}}, "http_read_timeout_s must be > 0"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    kwargs.setdefault("environ", {})
    with pytest.raises(ValueError) as err:
        load(kwargs.pop("flags", {}), **kwargs)
    assert message in str(err.value)


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping of settings"):
        load({}, config_file=path, environ={})


def test_every_setting_is_a_serve_flag_and_a_readme_row():
    import re
    from pathlib import Path

    from kvray.cluster.cli import build_parser
    from kvray.cluster.config import settings

    keys = set(settings())
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {a.dest for a in serve._actions if a.option_strings} - {"help", "config", "ray_serve"}
    assert flags == keys
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme[readme.index("| key | default | meaning |") :].split("\n\n")[0]
    rows = {
        k for line in table.splitlines()[2:] for k in re.findall(r"`(\w+)`", line.split("|")[1])
    }
    assert rows == keys, f"missing from README: {keys - rows}; not settings: {rows - keys}"


def test_flags_are_parsed_like_environment_variables():
    config = load({"max_num_seqs": "8", "enable_prefix_caching": "false", "target_ttft_s": "none"})
    assert config.engine.scheduler.max_num_seqs == 8
    assert config.engine.scheduler.enable_prefix_caching is False
    assert config.autoscaling.target_ttft_s is None
    with pytest.raises(ValueError, match="--max-num-seqs='eight' is not a valid int"):
        load({"max_num_seqs": "eight"})


def test_unknown_environment_variables_warn_and_are_ignored(caplog):
    # Kubernetes gives every pod service-link variables (KVRAY_GRPC_PORT=tcp://...) for a
    # Service named kvray-grpc, and kvray's own tooling reads KVRAY_TORCH_INDEX.
    environ = {
        "KVRAY_GRPC_PORT": "tcp://10.0.0.1:50051",
        "KVRAY_GRPC_SERVICE_HOST": "10.0.0.1",
        "KVRAY_TORCH_INDEX": "https://download.pytorch.org/whl/cpu",
        "KVRAY_REPLICAS": "2",
    }
    with caplog.at_level("WARNING"):
        config = load({}, environ=environ)
    assert config.replicas == 2
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "KVRAY_GRPC_PORT" in warned and "KVRAY_TORCH_INDEX" in warned
    assert "tcp://" not in warned  # values are not logged (they may be secrets)


@pytest.mark.parametrize(
    ("name", "value", "service"),
    [
        ("KVRAY_PORT", "tcp://10.0.0.1:50051", "kvray"),
        ("KVRAY_HTTP_PORT", "tcp://10.0.0.2:8080", "kvray-http"),
        ("KVRAY_HEALTH_PORT", "udp://[fd00::1]:50052", "kvray-health"),
    ],
)
def test_a_kubernetes_service_link_in_a_settings_place_is_ignored_with_a_warning(
    tmp_path, caplog, name, value, service
):
    path = tmp_path / "kvray.yaml"
    path.write_text("port: 6000\nhttp_port: 6001\nhealth_port: 6002\n")
    with caplog.at_level("WARNING"):
        config = load({}, config_file=path, environ={name: value, "KVRAY_REPLICAS": "2"})
    assert (config.port, config.http_port, config.health_port) == (6000, 6001, 6002)
    assert config.replicas == 2
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert name in warned and f"Service named {service}" in warned and value not in warned


@pytest.mark.parametrize("value", ["http://10.0.0.1:50051", "tcp://10.0.0.1", "port-50051"])
def test_a_bad_port_that_is_no_service_link_still_fails(value):
    with pytest.raises(ValueError, match=f"KVRAY_PORT='{value}' is not a valid int"):
        load({}, environ={"KVRAY_PORT": value})


@pytest.mark.parametrize(
    ("host", "with_tokens", "warned"),
    [
        ("0.0.0.0", False, True),
        ("::", False, True),
        ("10.1.2.3", False, True),
        ("0.0.0.0", True, False),
        ("127.0.0.1", False, False),
        ("::1", False, False),
        ("localhost", False, False),
    ],
)
def test_an_open_front_door_beyond_loopback_is_warned_about(
    tmp_path, caplog, host, with_tokens, warned
):
    from kvray.cluster.launcher import _warn_if_open
    from kvray.cluster.security import TokenAuth

    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    auth = TokenAuth(tokens) if with_tokens else None
    with caplog.at_level("WARNING", logger="kvray.cluster.launcher"):
        _warn_if_open(ClusterConfig(host=host), auth)
    assert ("without authentication" in caplog.text) is warned


def serve_flags(*argv: str) -> dict:
    from kvray.cluster.cli import build_parser
    from kvray.cluster.config import settings

    args = build_parser().parse_args(["serve", *argv])
    return {name: getattr(args, name) for name in settings()}


def test_bool_settings_are_switch_pairs():
    flags = serve_flags("--no-enable-prefix-caching", "--trust-remote-code")
    assert flags["enable_prefix_caching"] is False and flags["trust_remote_code"] is True
    config = load(flags, environ={})
    assert config.engine.scheduler.enable_prefix_caching is False
    assert config.engine.worker.trust_remote_code is True
    config = load(
        serve_flags("--enable-prefix-caching"), environ={"KVRAY_ENABLE_PREFIX_CACHING": "0"}
    )
    assert config.engine.scheduler.enable_prefix_caching is True  # the flag over the environment


def test_a_switch_left_out_lets_the_environment_decide():
    flags = serve_flags()
    assert flags["enable_prefix_caching"] is None
    config = load(flags, environ={"KVRAY_ENABLE_PREFIX_CACHING": "false"})
    assert config.engine.scheduler.enable_prefix_caching is False


def test_a_switch_takes_no_value():
    with pytest.raises(SystemExit):
        serve_flags("--enable-prefix-caching", "false")
