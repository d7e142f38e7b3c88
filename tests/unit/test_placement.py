"""Placement decisions as pure functions of replica stats: no Ray, no asyncio, no clock."""

from __future__ import annotations

import random

import pytest

from kvray.cluster.placement import (
    ROUTING_POLICIES,
    SESSION_IMBALANCE,
    Move,
    Placement,
    QueuedRequest,
    choose_replicas_to_remove,
    pick_replica,
    plan_rebalance,
)
from kvray.cluster.stats import ReplicaState, ReplicaStats

BUDGET = 100  # step budget (max_num_batched_tokens) of every replica here


def replica(replica_id, *, queued=0, running=0, kv=0, state=ReplicaState.READY):
    """A replica with `queued` prompt tokens waiting, `running` sequences and `kv` of 100 blocks."""
    return ReplicaStats(
        replica_id,
        state,
        num_waiting=1 if queued else 0,
        num_running=running,
        num_queued_tokens=queued,
        max_num_batched_tokens=BUDGET,
        kv_blocks_used=kv,
        kv_blocks_total=100,
    )


def queued(request_id, replica_id, tokens, arrival, cached=None):
    return QueuedRequest(request_id, replica_id, tokens, arrival, cached)


# ---------------------------------------------------------------------- pick_replica


def picked(replicas, **kwargs) -> str | None:
    placement = pick_replica(replicas, **kwargs)
    return None if placement is None else placement.replica_id


@pytest.fixture(params=ROUTING_POLICIES)
def routing(request):
    """Both policies: with nothing cached anywhere, cache-aware is least-loaded."""
    return request.param


def test_the_least_loaded_ready_replica_takes_a_new_request(routing):
    replicas = [replica("a", queued=300), replica("b", running=4), replica("c", queued=50)]
    assert pick_replica(replicas, routing=routing, num_prompt_tokens=40) == Placement("b", "load")


def test_equal_work_is_broken_by_kv_cache_use(routing):
    replicas = [replica("a", running=2, kv=60), replica("b", running=2, kv=10)]
    assert picked(replicas, routing=routing) == "b"


def test_starting_and_draining_replicas_take_nothing(routing):
    replicas = [
        replica("a", state=ReplicaState.STARTING),
        replica("b", state=ReplicaState.DRAINING),
        replica("c", queued=900),
    ]
    assert pick_replica(replicas, routing=routing) == Placement("c", "only-ready")
    assert picked(replicas[:2], routing=routing) is None
    assert picked([], routing=routing) is None


def test_a_session_stays_on_its_replica_while_it_is_not_much_busier(routing):
    within = int(SESSION_IMBALANCE * BUDGET)  # exactly the allowed extra work
    replicas = [replica("a"), replica("b", queued=within)]
    assert pick_replica(replicas, routing=routing, session_replica_id="b") == Placement(
        "b", "session"
    )


def test_a_session_leaves_a_replica_with_more_than_a_step_of_extra_work(routing):
    beyond = int(SESSION_IMBALANCE * BUDGET) + 1
    replicas = [replica("a"), replica("b", queued=beyond)]
    assert picked(replicas, routing=routing, session_replica_id="b") == "a"


def test_a_session_whose_replica_is_gone_or_draining_goes_to_the_least_loaded(routing):
    replicas = [replica("a", queued=10), replica("b", state=ReplicaState.DRAINING)]
    assert picked(replicas, routing=routing, session_replica_id="b") == "a"
    assert picked(replicas, routing=routing, session_replica_id="zzz") == "a"


def test_ties_go_to_the_first_replica_in_launch_order_every_time(routing):
    replicas = [replica("c", running=3), replica("a", running=3), replica("b", running=3)]
    cached = {"a": 32, "b": 32}  # a and b hold the same prefix: tied
    kwargs = dict(routing=routing, num_prompt_tokens=40, cached_tokens=cached)
    expected = "a" if routing == "cache-aware" else "c"
    assert {picked(replicas, **kwargs) for _ in range(5)} == {expected}


def test_the_replica_holding_the_prefix_takes_the_request_while_it_is_within_the_bound():
    # b holds 480 of the 500 prompt tokens: it is chosen while its work exceeds a's by less
    # than the 480 tokens it saves, and a is chosen from there on.
    cached = {"b": 480}
    for extra, expected in [(0, "b"), (479, "b"), (480, "a"), (2000, "a")]:
        replicas = [replica("a", running=5), replica("b", running=5, queued=extra)]
        placement = pick_replica(replicas, num_prompt_tokens=500, cached_tokens=cached)
        assert placement is not None and placement.replica_id == expected, extra
        assert placement.reason == ("prefix" if expected == "b" else "load")
    least_loaded = pick_replica(
        [replica("a"), replica("b", queued=1)], routing="least-loaded", cached_tokens=cached
    )
    assert least_loaded == Placement("a", "load")  # blind to the cache


def route(work: dict[str, int], holders: dict[str, set[str]], prompts, *, prefix_tokens=0):
    """Place `prompts` (prefix name, prompt tokens) one by one as the dispatcher would; each
    adds its uncached tokens to its replica's queued work, and its replica holds its prefix
    from then on. Returns where each went."""
    where = []
    for prefix, tokens in prompts:
        replicas = [replica(r, queued=w) for r, w in work.items()]
        cached = {r: prefix_tokens for r in holders.get(prefix, ())}
        chosen = picked(replicas, num_prompt_tokens=tokens, cached_tokens=cached)
        assert chosen is not None
        work[chosen] += tokens - cached.get(chosen, 0)
        holders.setdefault(prefix, set()).add(chosen)
        where.append(chosen)
    return where


def test_a_hot_prefix_spreads_to_more_replicas_instead_of_piling_onto_one():
    # 40 requests share a 512-token prefix (plus 32 of their own), with no step run between
    # them: the prefix's replica takes requests until it is 512 tokens busier, then another
    # computes the prefix once, and so on; the bound caps the imbalance.
    work = {"a": 0, "b": 0, "c": 0, "d": 0}
    where = route(work, {}, [("hot", 544)] * 40, prefix_tokens=512)
    assert set(where) == {"a", "b", "c", "d"}
    assert max(work.values()) - min(work.values()) <= 512 + 32
    assert sum(work.values()) == 4 * 512 + 40 * 32  # the prefix computed once per replica


def test_a_flood_of_unique_prompts_spreads_evenly():
    rng = random.Random(0)
    work = {"a": 0, "b": 0, "c": 0}
    sizes = [rng.randint(10, 400) for _ in range(300)]
    route(work, {}, [(f"p{i}", n) for i, n in enumerate(sizes)])
    assert max(work.values()) - min(work.values()) <= max(sizes)


def test_a_new_empty_replica_receives_work():
    # a and b hold the only prefix in use and are busy with it; c has just started, empty.
    work = {"a": 3000, "b": 3000, "c": 0}
    where = route(work, {"sys": {"a", "b"}}, [("sys", 300)] * 10, prefix_tokens=256)
    assert where[0] == "c"  # 3,000 tokens busier is beyond the 256 the cache saves
    assert where.count("c") >= 5


# ---------------------------------------------------------------------- plan_rebalance


def test_a_new_replica_takes_about_half_of_a_backlog_oldest_first():
    backlog = [queued(f"r{i:02d}", "a", 10, arrival=i) for i in range(20)]
    replicas = [replica("a", queued=200, running=2), replica("b")]
    moves = plan_rebalance(replicas, backlog)
    moved = [m.request_id for m in moves]
    assert all(m.source_id == "a" and m.dest_id == "b" for m in moves)
    # Dealt oldest first, alternately: each queue keeps a share of the oldest requests.
    assert moved == [f"r{i:02d}" for i in range(1, 20, 2)]
    work_a = 200 + 2 - 10 * len(moved)
    work_b = 10 * len(moved)
    assert abs(work_a - work_b) <= 10  # within one request's tokens


def test_balanced_replicas_move_nothing():
    backlog = [queued("x", "a", 10, 0), queued("y", "b", 10, 1)]
    replicas = [replica("a", queued=10, running=1), replica("b", queued=10, running=1)]
    assert plan_rebalance(replicas, backlog) == []


def test_a_request_moves_only_if_its_replica_stays_busier_without_it():
    # Moving the 60-token request from a (work 100) to b (work 50) would leave a with 40 and
    # b with 110: worse. It stays (no back and forth between near-equal replicas).
    replicas = [replica("a", queued=60, running=40), replica("b", running=50)]
    assert plan_rebalance(replicas, [queued("big", "a", 60, 0)]) == []


def test_a_draining_replica_hands_over_its_whole_queue():
    backlog = [queued(f"r{i}", "old", 5, i) for i in range(4)]
    replicas = [
        replica("old", queued=20, state=ReplicaState.DRAINING),
        replica("x", running=3),
        replica("y"),
    ]
    moves = plan_rebalance(replicas, backlog)
    assert [m.request_id for m in moves] == ["r0", "r1", "r2", "r3"]
    assert {m.dest_id for m in moves} == {"x", "y"}
    assert all(m.source_id == "old" for m in moves)


def test_one_ready_replica_keeps_its_own_queue():
    assert plan_rebalance([replica("a", queued=500)], [queued("r", "a", 500, 0)]) == []


def test_no_ready_replica_means_no_moves():
    draining = replica("a", queued=5, state=ReplicaState.DRAINING)
    assert plan_rebalance([draining], [queued("r", "a", 5, 0)]) == []


def test_three_replicas_share_a_backlog_and_ties_go_to_the_first_in_launch_order():
    backlog = [queued(f"r{i}", "a", 7 + i, i) for i in range(8)]
    replicas = [replica("a", queued=sum(7 + i for i in range(8))), replica("b"), replica("c")]
    moves = plan_rebalance(replicas, backlog)
    # r0 and r1 stay (a is not busier than an idle replica by more than their size); then
    # b and c, tied at first, take turns.
    assert moves == [
        Move("r2", "a", "b"),
        Move("r3", "a", "c"),
        Move("r5", "a", "b"),
        Move("r6", "a", "c"),
    ]
    assert moves == plan_rebalance(replicas, backlog)  # the same stats, the same plan


def test_a_moved_request_goes_where_its_prefix_is_cached_when_that_is_within_the_bound():
    # a is 1,000 tokens behind; b and c are idle but only c holds 480 of the request's 500.
    replicas = [replica("a", queued=1500), replica("b", running=20), replica("c", running=30)]
    request = queued("r", "a", 500, 0, cached={"c": 480})
    assert plan_rebalance(replicas, [request]) == [Move("r", "a", "c")]
    assert plan_rebalance(replicas, [request], routing="least-loaded") == [Move("r", "a", "b")]
    # c holding the prefix but busier than b by more than it saves: b.
    replicas[2] = replica("c", running=520)
    assert plan_rebalance(replicas, [request]) == [Move("r", "a", "b")]


def test_a_request_stays_on_the_replica_holding_its_prefix_unless_another_is_far_less_busy():
    # r's replica a holds its prefix; b is idle. Moving it makes sense only if a, without it,
    # is busier than b with r's whole prompt to compute.
    request = queued("r", "a", 500, 0, cached={"a": 480})
    near = [replica("a", queued=500 + 400), replica("b")]
    assert plan_rebalance(near, [request]) == []
    far = [replica("a", queued=500 + 600), replica("b")]
    assert plan_rebalance(far, [request]) == [Move("r", "a", "b")]


# ---------------------------------------------------------------------- scale-down


def test_scale_down_removes_starting_replicas_newest_first_then_the_least_loaded():
    replicas = [
        replica("r0", running=5),
        replica("r1", state=ReplicaState.STARTING),
        replica("r2"),
        replica("r3", state=ReplicaState.STARTING),
        replica("r4", running=1),
    ]
    assert choose_replicas_to_remove(replicas, 1) == ["r3"]
    assert choose_replicas_to_remove(replicas, 3) == ["r3", "r1", "r2"]
    assert choose_replicas_to_remove(replicas, 4) == ["r3", "r1", "r2", "r4"]


def test_scale_down_never_picks_a_draining_replica():
    replicas = [replica("a", state=ReplicaState.DRAINING), replica("b")]
    assert choose_replicas_to_remove(replicas, 2) == ["b"]
