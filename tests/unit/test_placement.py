"""Placement decisions as pure functions of replica stats: no Ray, no asyncio, no clock."""

from __future__ import annotations

from kvray.cluster.placement import (
    SESSION_IMBALANCE,
    Move,
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


def queued(request_id, replica_id, tokens, arrival):
    return QueuedRequest(request_id, replica_id, tokens, arrival)


# ---------------------------------------------------------------------- pick_replica


def test_the_least_loaded_ready_replica_takes_a_new_request():
    replicas = [replica("a", queued=300), replica("b", running=4), replica("c", queued=50)]
    assert pick_replica(replicas) == "b"


def test_equal_work_is_broken_by_kv_cache_use():
    replicas = [replica("a", running=2, kv=60), replica("b", running=2, kv=10)]
    assert pick_replica(replicas) == "b"


def test_starting_and_draining_replicas_take_nothing():
    replicas = [
        replica("a", state=ReplicaState.STARTING),
        replica("b", state=ReplicaState.DRAINING),
        replica("c", queued=900),
    ]
    assert pick_replica(replicas) == "c"
    assert pick_replica(replicas[:2]) is None
    assert pick_replica([]) is None


def test_a_session_stays_on_its_replica_while_it_is_not_much_busier():
    within = int(SESSION_IMBALANCE * BUDGET)  # exactly the allowed extra work
    replicas = [replica("a"), replica("b", queued=within)]
    assert pick_replica(replicas, session_replica_id="b") == "b"


def test_a_session_leaves_a_replica_with_more_than_a_step_of_extra_work():
    beyond = int(SESSION_IMBALANCE * BUDGET) + 1
    replicas = [replica("a"), replica("b", queued=beyond)]
    assert pick_replica(replicas, session_replica_id="b") == "a"


def test_a_session_whose_replica_is_gone_or_draining_goes_to_the_least_loaded():
    replicas = [replica("a", queued=10), replica("b", state=ReplicaState.DRAINING)]
    assert pick_replica(replicas, session_replica_id="b") == "a"
    assert pick_replica(replicas, session_replica_id="zzz") == "a"


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
