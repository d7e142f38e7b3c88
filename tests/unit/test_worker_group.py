"""A replica of several ranks, without Ray or a model: the group executor returns its output
rank's output (rank 0's; the last pipeline stage's first rank's) once the ranks agree, fails as
soon as any rank fails (while the others may still wait in a collective), and reports a
placement it did not get with what it asked for; the settings refuse what a replica of several
ranks cannot run yet."""

from __future__ import annotations

import asyncio

import pytest

from kvray.client import types as client_types
from kvray.cluster.config import load
from kvray.cluster.grpc_server import status_to_proto
from kvray.cluster.stats import ClusterStats, ReplicaState, ReplicaStats
from kvray.cluster.worker_group import PlacementError, WorkerGroup
from kvray.workers.protocol import RankInfo, StepInput, StepOutput, WorkerInfo
from kvray.workers.rank_group import group_info, group_output


def info(rank: int, **changes) -> WorkerInfo:
    fields = dict(
        model="m", device="cpu", dtype="torch.float32", vocab_size=10, max_model_len=32,
        eos_token_ids=(0,), block_size=4, num_kv_blocks=8, kv_cache_bytes=100, weights_bytes=50,
        implementation="kvray LlamaForCausalLM", tensor_parallel_size=2,
        ranks=(RankInfo(rank, "cpu", "node-a", 50, 100),),
    )  # fmt: skip
    fields.update(changes)
    return WorkerInfo(**fields)


def test_group_info_is_rank_zeros_with_every_rank_and_summed_bytes():
    got = group_info(
        [info(0), info(1, weights_bytes=60, ranks=(RankInfo(1, "cpu", "b", 60, 100),))]
    )
    assert [r.rank for r in got.ranks] == [0, 1]
    assert (got.weights_bytes, got.kv_cache_bytes) == (110, 200)
    assert got.num_kv_blocks == 8


def test_ranks_that_disagree_on_the_cache_are_refused():
    with pytest.raises(ValueError, match="num_kv_blocks"):
        group_info([info(0), info(1, num_kv_blocks=7)])


def test_ranks_that_sampled_different_tokens_fail_the_step():
    rank0 = StepOutput(3, seq_ids=[1, 2], sampled_token_ids=[5, 6], forward_s=0.1)
    assert group_output([rank0, StepOutput(3, [1, 2], [5, 6])], output_rank=0) is rank0
    with pytest.raises(RuntimeError, match="rank 1 holds"):
        group_output([rank0, StepOutput(3, [1, 2], [5, 7])], output_rank=0)


class Rank:
    """A rank actor's `step` remote in asyncio: the call is sent (recorded) at once, as Ray
    sends it, and its answer waits on `gate` (a collective in progress)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.gate = asyncio.Event()
        self.sent: list[int] = []
        self.error: BaseException | None = None
        self.step = self  # `rank.step.remote(...)`, as on an actor

    def remote(self, step_input: StepInput) -> asyncio.Future[StepOutput]:
        self.sent.append(step_input.step_id)
        return asyncio.ensure_future(self._step(step_input))

    async def _step(self, step_input: StepInput) -> StepOutput:
        if self.error is not None:
            raise self.error
        await self.gate.wait()
        return StepOutput(step_input.step_id, [1], [7], forward_s=0.5 if self.rank == 0 else 0)


class NeverReady:
    def ready(self):
        return asyncio.get_running_loop().create_future()  # never done


def group(ranks, placement=None, timeout_s=60.0, output_rank=0) -> WorkerGroup:
    bundles = [{"CPU": 0.5}] * len(ranks)
    return WorkerGroup(
        "replica-7", ranks, placement or NeverReady(), bundles=bundles, strategy="STRICT_PACK",
        placement_timeout_s=timeout_s, output_rank=output_rank,
    )  # fmt: skip


def test_a_step_goes_to_every_rank_and_rank_zeros_output_comes_back():
    async def run():
        ranks = [Rank(0), Rank(1)]
        pending = group(ranks).step.remote(StepInput(step_id=4))
        assert [r.sent for r in ranks] == [[4], [4]]  # sent at once, before any await
        for r in ranks:
            r.gate.set()
        return await pending

    out = asyncio.run(run())
    assert (out.step_id, out.forward_s) == (4, 0.5)


def test_a_pipelines_step_is_answered_by_its_last_stage():
    async def run():
        ranks = [Rank(0), Rank(1)]
        pending = group(ranks, output_rank=1).step.remote(StepInput(step_id=4))
        for r in ranks:
            r.gate.set()
        return await pending

    out = asyncio.run(run())
    assert (out.step_id, out.forward_s) == (4, 0.0)  # rank 1's (rank 0 reports 0.5)


def test_a_failed_rank_fails_the_step_while_rank_zero_still_waits():
    async def run():
        ranks = [Rank(0), Rank(1)]
        ranks[1].error = ConnectionError("rank 1 died")
        # rank 0's gate stays shut: it would wait in its collective for the dead rank forever
        return await asyncio.wait_for(group(ranks).step.remote(StepInput(step_id=1)), 5)

    with pytest.raises(ConnectionError, match="rank 1 died"):
        asyncio.run(run())


def test_a_group_that_is_not_placed_fails_its_start_naming_what_it_asked_for():
    async def run():
        return await group([Rank(0), Rank(1)], timeout_s=0.05).warmup.remote()

    with pytest.raises(PlacementError) as error:
        asyncio.run(run())
    message = str(error.value)
    assert "2 bundles of {'CPU': 0.5}" in message and "STRICT_PACK" in message
    assert "placement_timeout_s=0.05" in message


def two_rank_status() -> ClusterStats:
    ranks = (RankInfo(0, "cpu", "node-a", 50, 100), RankInfo(1, "cpu", "node-b", 60, 100))
    return ClusterStats(
        replicas=[ReplicaStats("replica-0", ReplicaState.READY, ranks=ranks)],
        queue_depth=0, num_running=0, num_moved_requests=0, num_rebalanced_requests=0,
        min_replicas=1, max_replicas=1, target_replicas=1,
    )  # fmt: skip


def test_a_replicas_ranks_survive_the_wire():
    got = client_types.status_from_proto(status_to_proto(two_rank_status()))
    assert got.replicas[0].ranks == [
        client_types.RankInfo(0, "cpu", "node-a", 50, 100),
        client_types.RankInfo(1, "cpu", "node-b", 60, 100),
    ]


def test_metrics_show_each_ranks_device_and_bytes():
    from kvray.cluster.metrics import ServingMetrics

    text = ServingMetrics("m", two_rank_status).render().decode()
    assert (
        'kvray:replica_rank_info{device="cpu",model_name="m",node="node-b",rank="1",'
        'replica_id="replica-0"} 1.0'
    ) in text
    assert (
        'kvray:replica_rank_weights_bytes{model_name="m",rank="1",replica_id="replica-0"} 60.0'
        in text
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"pipeline_parallel_size": 0}, "pipeline_parallel_size must be >= 1"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be >= 1"),
        ({"pipeline_parallel_size": 2, "model": "fake"}, "pipeline_parallel_size 1 only"),
        ({"tensor_parallel_size": 2, "decode_graphs": "on"}, "decode_graphs on does not run"),
        ({"tensor_parallel_size": 2, "model": "fake"}, "model fake (scripted tokens) runs at"),
    ],
)
def test_settings_tensor_parallelism_cannot_run_are_refused_by_name(flags, message):
    with pytest.raises(ValueError) as error:
        load(flags, environ={})
    assert message in str(error.value)


def test_int8_is_accepted_with_several_ranks():
    config = load({"tensor_parallel_size": 2, "quantization": "int8"}, environ={})
    assert config.engine.worker.quantization == "int8"


def test_the_parallel_sizes_come_from_the_environment_too():
    config = load({}, environ={"KVRAY_TENSOR_PARALLEL_SIZE": "2"})
    assert config.engine.worker.tensor_parallel_size == 2
    assert config.engine.worker.world_size == 2
    config = load({"tensor_parallel_size": 2}, environ={"KVRAY_PIPELINE_PARALLEL_SIZE": "2"})
    assert config.engine.worker.world_size == 4


def test_a_pipelines_stages_are_bundles_of_their_ranks_packed_not_strictly():
    from kvray.cluster.worker_actor import group_bundles

    rank = {"CPU": 1.0, "GPU": 1.0}
    assert group_bundles(rank, 2, 1) == ([rank, rank], "STRICT_PACK")
    assert group_bundles(rank, 1, 2) == ([rank, rank], "PACK")
    stage = {"CPU": 2.0, "GPU": 2.0}  # a stage's tensor-parallel ranks, never split over nodes
    assert group_bundles(rank, 2, 3) == ([stage] * 3, "PACK")
