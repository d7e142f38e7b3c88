"""The autoscaling policy: targets, bounds, delays against flapping, scale from zero."""

from __future__ import annotations

import pytest

from kvray.cluster.autoscaling_policy import AutoscalingConfig, AutoscalingPolicy, LoadSample


def sample(replicas, ongoing=0, kv=0.0, ttft=None):
    return LoadSample(replicas, ongoing, kv, ttft)


def scaler(**overrides):
    config = AutoscalingConfig(
        **{"target_ongoing_requests": 8, "upscale_delay_s": 2, "downscale_delay_s": 5, **overrides}
    )
    return AutoscalingPolicy(config, min_replicas=1, max_replicas=4)


def test_desired_follows_the_strongest_signal():
    s = scaler(target_ttft_s=0.5)
    assert s.desired(sample(1, ongoing=20))[0] == 3  # 20 / 8
    assert s.desired(sample(1, ongoing=1, kv=1.5))[0] == 2  # 1.5 / 0.8
    assert s.desired(sample(2, ongoing=1, ttft=1.0))[0] == 4  # 2 * 1.0 / 0.5
    assert s.desired(sample(2, ongoing=100))[0] == 4  # max bound
    assert s.desired(sample(3))[0] == 1  # min bound


def test_reason_carries_the_numbers():
    _, reason = scaler().desired(sample(1, ongoing=20, kv=0.4))
    assert "ongoing=20" in reason and "kv=0.40" in reason and "bounds [1, 4]" in reason


def test_upscale_waits_for_the_delay_and_resets_when_load_drops():
    s = scaler()
    assert s.decide(0.0, sample(1, ongoing=20)) is None
    assert s.decide(1.0, sample(1, ongoing=20)) is None
    assert s.decide(1.5, sample(1, ongoing=4)) is None  # dipped: the clock restarts
    assert s.decide(2.5, sample(1, ongoing=20)) is None
    decision = s.decide(4.5, sample(1, ongoing=20))
    assert decision is not None and (decision.from_replicas, decision.to_replicas) == (1, 3)


def test_downscale_waits_longer():
    s = scaler()
    for t in (0, 1, 2, 3, 4.9):
        assert s.decide(t, sample(3, ongoing=2)) is None
    decision = s.decide(5.0, sample(3, ongoing=2))
    assert decision is not None and decision.to_replicas == 1


def test_scale_from_zero_is_immediate_and_idle_goes_to_zero():
    s = AutoscalingPolicy(AutoscalingConfig(downscale_delay_s=3), min_replicas=0, max_replicas=2)
    decision = s.decide(0.0, sample(0, ongoing=1))
    assert decision is not None and decision.to_replicas == 1
    assert s.decide(1.0, sample(1, ongoing=0)) is None
    decision = s.decide(4.0, sample(1, ongoing=0))
    assert decision is not None and decision.to_replicas == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_ongoing_requests": 0}, "target_ongoing_requests must be > 0"),
        ({"target_kv_cache_usage": 1.5}, "target_kv_cache_usage must be in (0, 1]"),
        ({"upscale_delay_s": -1}, "upscale_delay_s must be >= 0"),
    ],
)
def test_bad_config_is_named(kwargs, message):
    with pytest.raises(ValueError) as err:
        AutoscalingConfig(**kwargs)
    assert message in str(err.value)


def test_bounds_default_to_replicas_and_are_checked():
    assert AutoscalingConfig().bounds(2) == (2, 2)
    assert AutoscalingConfig(min_replicas=0, max_replicas=3).bounds(1) == (0, 3)
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        AutoscalingConfig(min_replicas=3, max_replicas=2).bounds(1)
