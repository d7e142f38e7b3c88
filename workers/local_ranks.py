"""A replica's ranks as processes on this machine, for the offline `LLM` at
tensor_parallel_size x pipeline_parallel_size > 1 (the cluster runs them as Ray actors:
`cluster/worker_group.py`).

`LocalRanks` has a worker's interface (`warmup`, `step`, `health`): each call goes to every
rank over its pipe, and the output rank's answer comes back (`rank_group.output_rank`: the
last stage's first rank). Every rank is a spawned process (none runs
in the caller's), so the caller holds no `torch.distributed` state and can build several.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import socket
from multiprocessing.connection import Connection, wait
from typing import Any

from kvray.workers.config import EngineConfig, WorkerConfig
from kvray.workers.protocol import StepInput, StepOutput, WorkerInfo
from kvray.workers.rank_group import group_info, group_output, output_rank

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 600.0  # joining the group and loading a shard
CLOSE_TIMEOUT_S = 10.0


class RankFailedError(RuntimeError):
    """A rank's process died or failed a call; the group can no longer step."""


class LocalRanks:
    def __init__(self, engine_config: EngineConfig) -> None:
        """Start `world_size` rank processes and wait until each has loaded its shard.

        Raises:
            ValueError: a setting the model or machine cannot run (before any process starts),
                or what a rank raised while loading.
            RankFailedError: a rank's process died while loading.
        """
        world = engine_config.worker.world_size
        self.output_rank = output_rank(
            engine_config.worker.tensor_parallel_size, engine_config.worker.pipeline_parallel_size
        )
        _check_splits(engine_config)
        check_fits(engine_config.worker)
        threads = max(1, (os.cpu_count() or 1) // world)
        init_method = f"tcp://127.0.0.1:{free_port()}"
        context = multiprocessing.get_context("spawn")  # NOTE: no fork of a torch process
        self.pipes: list[Connection] = []
        self.processes: list[Any] = []
        for rank in range(world):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=_serve_rank,
                args=(engine_config, rank, init_method, threads, theirs),
                name=f"kvray-rank-{rank}",
                daemon=True,
            )
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)
        try:
            self._gather(timeout=LOAD_TIMEOUT_S)
        except BaseException:
            self.close()
            raise

    def warmup(self) -> WorkerInfo:
        return group_info(self._call("warmup"))

    def step(self, step_input: StepInput) -> StepOutput:
        return group_output(self._call("step", step_input), output_rank=self.output_rank)

    def health(self) -> bool:
        return all(self._call("health"))

    def close(self) -> None:
        """Stop every rank's process (idempotent)."""
        for pipe in self.pipes:
            with contextlib.suppress(OSError):  # already gone
                pipe.send(None)
        for process in self.processes:
            process.join(timeout=CLOSE_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
        for pipe in self.pipes:
            pipe.close()
        self.pipes, self.processes = [], []

    def _call(self, method: str, *args: Any) -> list[Any]:
        if not self.pipes:
            raise RankFailedError("the ranks were closed")
        try:
            for pipe in self.pipes:
                pipe.send((method, args))
        except OSError as exc:
            raise RankFailedError(f"a rank's process is gone ({exc})") from exc
        return self._gather(timeout=None)

    def _gather(self, *, timeout: float | None) -> list[Any]:
        """Every rank's answer, in rank order; the first error raised as soon as it arrives
        (the other ranks may be waiting in a collective for the failed one)."""
        answers: dict[int, Any] = {}
        pending = dict(enumerate(self.pipes))
        while pending:
            ready = wait(list(pending.values()), timeout=timeout)
            if not ready:
                raise RankFailedError(f"ranks {sorted(pending)} did not answer in {timeout}s")
            for rank, pipe in list(pending.items()):
                if pipe not in ready:
                    continue
                try:
                    failed, value = pipe.recv()
                except (EOFError, OSError):
                    self.processes[rank].join(timeout=1.0)
                    code = self.processes[rank].exitcode
                    raise RankFailedError(
                        f"rank {rank}'s process died (exit code {code})"
                    ) from None
                if failed:
                    raise value
                answers[rank] = value
                del pending[rank]
        return [answers[rank] for rank in range(len(self.pipes))]


def check_fits(config: WorkerConfig) -> None:
    """Refuse a group bigger than this machine: one GPU per rank, or one CPU core.

    Raises:
        ValueError: naming tensor_parallel_size and what the machine has.
    """
    from kvray.workers import device as devices

    device = devices.resolve_device(config.device)
    if device.type == "cuda":
        available, what = devices.cuda_device_count(), "GPUs"
    else:
        available, what = os.cpu_count() or 1, "CPU cores"
    if config.world_size > available:
        raise ValueError(
            f"tensor_parallel_size {config.tensor_parallel_size} x pipeline_parallel_size "
            f"{config.pipeline_parallel_size} needs {config.world_size} {what}, one a rank; "
            f"this machine has {available}"
        )


def _check_splits(engine_config: EngineConfig) -> None:
    """The model's refusals (an architecture or sizes the group cannot split) before any
    process starts."""
    from kvray.workers.checkpoints import resolve_model
    from kvray.workers.tensor_parallel import check_splits

    worker = engine_config.worker
    check_splits(resolve_model(worker.model, cache_dir=engine_config.cache_dir), worker)


def free_port() -> int:
    """A TCP port free on this machine now (the group's rendezvous; taken a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve_rank(
    engine_config: EngineConfig, rank: int, init_method: str, threads: int, pipe: Connection
) -> None:
    """A rank process: load the worker, then answer calls until told to stop (None)."""
    import torch

    from kvray.workers.worker import ModelWorker

    torch.set_num_threads(threads)
    try:
        worker = ModelWorker(engine_config, rank=rank, init_method=init_method)
    except BaseException as exc:
        pipe.send((True, _picklable(exc)))
        return
    pipe.send((False, None))
    while True:
        try:
            call = pipe.recv()
        except EOFError:
            return  # the caller is gone
        if call is None:
            return
        method, args = call
        try:
            pipe.send((False, getattr(worker, method)(*args)))
        except BaseException as exc:
            pipe.send((True, _picklable(exc)))


def _picklable(exc: BaseException) -> BaseException:
    """`exc` if it crosses a pipe; else a RuntimeError with its message."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
