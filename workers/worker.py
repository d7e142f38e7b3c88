"""ModelWorker: one model replica and its paged KV cache, executing steps the router schedules.

A plain class: the cluster makes it a Ray actor in one place; tests and the offline engine
call it in-process.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import socket
import time
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from kvray.workers import cpu_kernels
from kvray.workers import device as devices
from kvray.workers.attention import register as register_attention
from kvray.workers.checkpoints import BUILTIN_SAMPLING_DEFAULTS, resolve_model
from kvray.workers.config import EngineConfig
from kvray.workers.decode_graphs import batch_sizes
from kvray.workers.execution_plan import decide_plan, prepare_model
from kvray.workers.generation_config import sampling_defaults
from kvray.workers.host_memory import release_free_memory
from kvray.workers.kv_cache import KVCache, KVCacheSpec
from kvray.workers.model_runner import ModelRunner, ScheduledSeq
from kvray.workers.models.parallel import SINGLE_RANK
from kvray.workers.protocol import RankInfo, StepInput, StepOutput, WorkerInfo
from kvray.workers.rank_group import output_rank
from kvray.workers.sampler import (
    Sampler,
    SamplingRow,
    beam_candidates,
    prepare_sampling_batch,
    prompt_logprobs,
)
from kvray.workers.sequences import SequenceTable, WorkerSequence
from kvray.workers.structured_output import WorkerGrammars
from kvray.workers.tensor_parallel import (
    RankGroups,
    generation_config,
    join_group,
    load_rank_model,
    smallest_over_ranks,
)
from kvray.workers.token_bitmask import prepare_grammar_masks

logger = logging.getLogger(__name__)


class ModelWorker:
    def __init__(
        self, engine_config: EngineConfig, *, rank: int = 0, init_method: str | None = None
    ) -> None:
        """Load the model (weights only; the KV cache is sized and allocated by `warmup`).

        With several ranks (`tensor_parallel_size` x `pipeline_parallel_size` > 1) this is rank
        `rank` of its replica: it joins the group at `init_method` (a `torch.distributed`
        address, e.g. tcp://10.0.0.1:29500; blocks until every rank has joined) and loads its
        shard of its stage of kvray's own model (`workers/models`).

        Raises:
            ValueError: a setting the model or machine cannot run (naming the setting).
        """
        self.config = engine_config.worker
        self.limits = engine_config.scheduler  # the largest step the scheduler may build
        cpu_kernels.set_enabled(self.config.cpu_kernels)  # before loading: packing asks for them
        self.device = devices.resolve_device(self.config.device)
        if self.config.quantization is not None and self.device.type != "cpu":
            raise ValueError(
                f"quantization {self.config.quantization} runs on CPU only; on {self.device} "
                "leave it unset (bf16) or serve a checkpoint quantized for GPUs"
            )
        # NOTE: resolved (a built-in model built) before joining a group: transformers saves a
        # model's weights only on rank 0 of an initialised torch.distributed group.
        self.model_path = resolve_model(self.config.model, cache_dir=engine_config.cache_dir)
        self.groups = RankGroups(SINGLE_RANK, SINGLE_RANK, 0, 1, None)
        if self.config.world_size > 1:
            self.device = devices.rank_device(self.device, rank)
            self.groups = join_group(
                rank=rank,
                tensor_parallel_size=self.config.tensor_parallel_size,
                pipeline_parallel_size=self.config.pipeline_parallel_size,
                init_method=init_method,
                device=self.device,
            )
        self.rank = rank
        self.output_rank = output_rank(
            self.config.tensor_parallel_size, self.config.pipeline_parallel_size
        )
        self.is_last_stage = self.groups.stage_index == self.groups.num_stages - 1
        self.step_s = 0.0  # in steps, for `stage_seconds`
        # NOTE: only `auto` reads the checkpoint's dtype (a config load).
        saved = self._checkpoint_dtype() if self.config.dtype == "auto" else None
        self.dtype = devices.resolve_dtype(self.config.dtype, self.device, checkpoint_dtype=saved)
        torch.manual_seed(self.config.seed)
        self.model = self._load_model()
        self.plan = decide_plan(
            self.model,
            device=self.device,
            dtype=self.dtype,
            settings=self.config,
            groups=self.groups,
        )
        start = time.perf_counter()
        prepare_model(self.model, self.plan)
        logger.info(
            "execution plan on %s (prepared in %.1fs): %s",
            self.device,
            time.perf_counter() - start,
            ", ".join(f"{key} {value}" for key, value in self.plan.as_dict().items()),
        )
        text_config = self.model.config.get_text_config()
        self.vocab_size = int(text_config.vocab_size)
        self.max_model_len = self._max_model_len(text_config)
        self.eos_token_ids = self._eos_token_ids()
        self.sampling_defaults = self._sampling_defaults()
        self.kv_spec = (
            self.model.kv_cache_spec(self.dtype)  # this rank's KV heads
            if self.plan.is_own_model
            else KVCacheSpec.from_model_config(self.model.config, self.dtype)
        )
        self.sampler = Sampler(cpu_kernels.argmax_rows() if self.device.type == "cpu" else None)
        self.kv_cache: KVCache | None = None
        self.runner: ModelRunner | None = None
        self.table = SequenceTable()
        self.info: WorkerInfo | None = None

    def _checkpoint_dtype(self) -> torch.dtype | None:
        """The dtype the checkpoint's config says its weights are saved in, if any."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(
            self.model_path,
            revision=self.config.revision,
            trust_remote_code=self.config.trust_remote_code,
        )
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, None)
        return dtype if isinstance(dtype, torch.dtype) else None

    def _load_model(self) -> Any:
        """transformers' model, or with several ranks this rank's shard of its stage of kvray's
        own model, as saved (`execution_plan.prepare_model` then converts its layers)."""
        # NOTE: the one choice made before the plan: it needs the model the plan is made for.
        if self.config.world_size > 1:
            return load_rank_model(
                self.model_path,
                self.config,
                groups=self.groups,
                dtype=self.dtype,
                device=self.device,
            )
        return self._load_transformers_model()

    def _load_transformers_model(self) -> PreTrainedModel:
        from transformers import AutoModelForCausalLM

        logger.info("loading %s on %s as %s", self.model_path, self.device, self.dtype)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            self.model_path,
            dtype=self.dtype,
            attn_implementation=register_attention(),
            revision=self.config.revision,
            trust_remote_code=self.config.trust_remote_code,
        )
        # NOTE: through nn.Module's signature: transformers' `to` is typed as a bare wrapper.
        cast(torch.nn.Module, model).to(self.device).eval()
        logger.info("loaded in %.1fs", time.perf_counter() - start)
        return model

    def _max_model_len(self, text_config: object) -> int:
        native = getattr(text_config, "max_position_embeddings", None) or 2048
        if self.config.max_model_len is None:
            return int(native)
        if self.config.max_model_len > native:
            raise ValueError(
                f"max_model_len={self.config.max_model_len} exceeds the model's "
                f"max_position_embeddings={native}"
            )
        return self.config.max_model_len

    def _eos_token_ids(self) -> tuple[int, ...]:
        gen = generation_config(self.model, self.model_path, self.config)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)

    def _sampling_defaults(self) -> dict[str, float]:
        if self.config.generation_config == "none":
            return {}
        defaults = sampling_defaults(
            self.model_path,
            builtin=BUILTIN_SAMPLING_DEFAULTS.get(self.config.model, {}),
            revision=self.config.revision,
            trust_remote_code=self.config.trust_remote_code,
        )
        if defaults:
            logger.info("the model's sampling defaults for unset parameters: %s", defaults)
        return defaults

    # ------------------------------------------------------------------ lifecycle

    def warmup(self) -> WorkerInfo:
        """Size and allocate the KV cache, run one forward to warm kernels, report limits.

        On a GPU the cache takes `gpu_memory_utilization` of the device minus the weights and
        the peak of a profiled forward of `max_num_batched_tokens`; on CPU `cpu_kv_cache_gib`,
        capped at what `max_num_seqs` full-length sequences need. An explicit `num_kv_blocks`
        or `kv_cache_bytes` overrides both. Idempotent.
        """
        if self.info is not None:
            return self.info
        cpu_kernels.set_enabled(self.config.cpu_kernels)  # again: the runner asks for its ops
        release_free_memory()  # what loading freed: the originals of fused and packed layers
        block_bytes = self.kv_spec.bytes_per_block(self.config.block_size)
        min_blocks = -(-self.max_model_len // self.config.block_size)
        num_blocks = self.config.num_kv_blocks or self._budget_bytes() // block_bytes
        is_default_size = self.config.num_kv_blocks is None and self.config.kv_cache_bytes is None
        if is_default_size and self.device.type != "cuda":
            num_blocks = min(num_blocks, self.limits.max_num_seqs * min_blocks)
        num_blocks = smallest_over_ranks(self.groups.replica, num_blocks, self.device)
        if num_blocks < min_blocks:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks but one full-length sequence needs "
                f"{min_blocks}; lower max_model_len or give the cache more memory"
            )
        self.kv_cache = KVCache(
            self.kv_spec,
            num_blocks=num_blocks,
            block_size=self.config.block_size,
            device=self.device,
        )
        self.runner = ModelRunner(self.model, self.kv_cache, self.device, self.plan)
        self.plan = self.runner.plan
        self._run_dummy_forward(min(self.limits.max_num_batched_tokens, self.max_model_len))
        self._build_decode_graphs()
        if self.config.world_size > 1:
            # NOTE: unseeded rows draw from the global generator; every rank must draw the same
            # numbers to sample the same tokens, whatever loading and warming up drew.
            torch.manual_seed(self.config.seed)
        weights_bytes = sum(
            t.numel() * t.element_size()
            for t in itertools.chain(self.model.parameters(), self.model.buffers())
        )
        grammars = self._load_grammars()
        release_free_memory()  # the dummy forward's activations
        self.info = WorkerInfo(
            model=self.model_path,
            device=devices.device_name(self.device),
            dtype=str(self.dtype),
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            eos_token_ids=self.eos_token_ids,
            block_size=self.config.block_size,
            num_kv_blocks=num_blocks,
            kv_cache_bytes=self.kv_cache.num_bytes,
            weights_bytes=weights_bytes,
            quantization=self.config.quantization,
            decode_graph_batch_sizes=tuple(self.runner.graphs.sizes) if self.runner.graphs else (),
            sampling_defaults=self.sampling_defaults,
            can_constrain_output=grammars is not None,
            implementation=self.plan.description,
            execution_plan=self.plan.as_dict(),
            tensor_parallel_size=self.config.tensor_parallel_size,
            pipeline_parallel_size=self.config.pipeline_parallel_size,
            ranks=(
                RankInfo(
                    rank=self.rank,
                    device=devices.device_name(self.device),
                    node=socket.gethostname(),
                    weights_bytes=weights_bytes,
                    kv_cache_bytes=self.kv_cache.num_bytes,
                ),
            ),
        )
        logger.info(
            "KV cache: %d blocks of %d tokens (%.1f MiB)",
            num_blocks,
            self.config.block_size,
            self.kv_cache.num_bytes / 2**20,
        )
        return self.info

    def _load_grammars(self) -> WorkerGrammars | None:
        """Structured output's engine on the model's tokenizer; constrained sequences get their
        grammar as they arrive (`SequenceTable.make_grammar`)."""
        grammars = WorkerGrammars.load(
            self.model_path,
            revision=self.config.revision,
            trust_remote_code=self.config.trust_remote_code,
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_token_ids,
        )
        if grammars is not None:
            self.table.make_grammar = grammars.sequence_grammar
        return grammars

    def _build_decode_graphs(self) -> None:
        """Decode steps as replays (workers/decode_graphs.py), where `decode_graphs` asks."""
        assert self.runner is not None
        if not self.plan.decode_graphs:
            if self.config.decode_graphs == "on":
                logger.info(
                    "decode steps run eagerly: no paged decode kernel for %s on %s",
                    self.dtype,
                    self.device,
                )
            return
        self.runner.build_decode_graphs(self._max_graph_batch(), self.max_model_len)
        if self.runner.graphs is None:  # the build failed and said why: steps stay eager
            self.plan = self.runner.plan = dataclasses.replace(self.plan, decode_graphs=False)

    def _max_graph_batch(self) -> int:
        if self.config.max_graph_batch:
            return self.config.max_graph_batch
        # NOTE: a GPU captures a graph per size; a CPU compiles one graph for every size.
        cuda = self.device.type == "cuda"
        return min(self.limits.max_num_seqs, 256) if cuda else self.limits.max_num_seqs

    def _budget_bytes(self) -> int:
        if self.config.kv_cache_bytes is not None:
            return self.config.kv_cache_bytes
        if self.device.type != "cuda":
            return int(self.config.cpu_kv_cache_gib * 2**30)
        # Profile the largest step with a throwaway cache to learn the activation peak.
        num_tokens = min(self.limits.max_num_batched_tokens, self.max_model_len)
        blocks = -(-num_tokens // self.config.block_size)
        self.kv_cache = KVCache(
            self.kv_spec, num_blocks=blocks, block_size=self.config.block_size, device=self.device
        )
        self.runner = ModelRunner(self.model, self.kv_cache, self.device, self.plan)
        devices.reset_peak_memory(self.device)
        self._run_dummy_forward(num_tokens)
        peak = devices.peak_memory_bytes(self.device)
        self.kv_cache = self.runner = None
        devices.empty_cache(self.device)
        total = devices.total_memory_bytes(self.device)
        # NOTE: decode graphs are captured after the cache is allocated, and each keeps its
        # logits (4 bytes each: some models return fp32); their activations share one pool,
        # smaller than the profiled prefill's peak.
        graphs = self.plan.decode_graphs
        sizes = batch_sizes(self._max_graph_batch(), self.device)
        graph_logits = sum(sizes) * self.vocab_size * 4 * graphs
        budget = int(total * self.config.gpu_memory_utilization) - peak - graph_logits
        if budget <= 0:
            raise ValueError(
                f"no memory left for the KV cache: peak use {peak / 2**30:.1f} GiB of "
                f"{total / 2**30:.1f} GiB; raise gpu_memory_utilization or lower "
                "max_num_batched_tokens"
            )
        return budget

    def _run_dummy_forward(self, num_tokens: int) -> None:
        assert self.runner is not None
        seq = ScheduledSeq(
            token_ids=[0] * num_tokens,
            block_ids=list(range(-(-num_tokens // self.config.block_size))),
            num_computed=0,
            num_tokens=num_tokens,
        )
        self.runner.execute(self.runner.prepare([seq]))
        devices.synchronize(self.device)

    def health(self) -> bool:
        return self.info is not None

    # ------------------------------------------------------------------ steps

    def step(self, step_input: StepInput) -> StepOutput:
        """Run one forward over the scheduled sequences and sample their next tokens.

        Mutates the worker's sequence table: applies the step's diffs (`SequenceTable.apply`),
        advances computed counts and appends each sampled token. A rank of a split replica
        other than its output rank returns only its sampled tokens (`rank_group.group_output`
        checks them); a rank before the last pipeline stage computes its layers, sends its
        hidden states on and takes the tokens the last stage sampled.

        Raises:
            RuntimeError: `warmup()` has not run.
            KeyError / AssertionError: the step disagrees with the worker's state (a router bug).
        """
        if self.runner is None:
            raise RuntimeError("ModelWorker.step before warmup()")
        start = time.perf_counter()
        seqs = self.table.apply(step_input)
        self.runner.kv_cache.copy_blocks([(c.src, c.dst) for c in step_input.block_copies])
        out = StepOutput(step_id=step_input.step_id)
        if not seqs:
            return out
        scheduled = [
            ScheduledSeq(
                seq.token_ids, seq.block_ids, computed, n, _num_prompt_logits(seq, computed, n)
            )
            for seq, n, computed in zip(
                seqs, step_input.num_scheduled_tokens, step_input.num_computed_tokens
            )
        ]
        model_input = self.runner.prepare(scheduled)
        logits = self.runner.execute(model_input)  # [num_samples + num_prompt_logits, vocab]
        sampling_idx = [i for i in model_input.order if scheduled[i].samples]
        sampling = [(i, seqs[i]) for i in sampling_idx]
        if not self.is_last_stage:  # NOTE: no logits here: the last stage samples
            self._take_sampled(out, sampling, step_input)
            return self._finish(out, seqs, step_input, start)
        self._sample(out, logits[: len(sampling_idx)], sampling, step_input)
        if self.groups.links is not None:
            self.groups.links.send_tokens(out.sampled_token_ids)
        for i, offset in model_input.prompt_row_offsets.items():
            seq, first = seqs[i], scheduled[i].num_computed + 1
            count = scheduled[i].num_prompt_logits
            rows = logits[len(sampling_idx) + offset : len(sampling_idx) + offset + count]
            assert seq.sampling_params.prompt_logprobs is not None
            out.prompt_logprobs[step_input.seq_ids[i]] = (
                first,
                prompt_logprobs(
                    rows, seq.token_ids[first : first + count], seq.sampling_params.prompt_logprobs
                ),
            )
        return self._finish(out, seqs, step_input, start)

    def _finish(
        self, out: StepOutput, seqs: list[WorkerSequence], step_input: StepInput, start: float
    ) -> StepOutput:
        self.table.advance(seqs, step_input)
        out.forward_s = time.perf_counter() - start
        self.step_s += out.forward_s
        if self.rank != self.output_rank:
            # NOTE: a group answers with its output rank's output; the others' tokens only show
            # that the ranks agree (`rank_group.group_output`), so nothing else need cross a
            # process.
            return StepOutput(out.step_id, out.seq_ids, out.sampled_token_ids)
        return out

    def _take_sampled(
        self, out: StepOutput, rows: list[tuple[int, WorkerSequence]], step_input: StepInput
    ) -> None:
        """Before the last stage: the tokens it sampled, appended as if sampled here (beams'
        candidates are the router's to choose; it sends the chosen tokens in the next step)."""
        assert self.groups.links is not None
        samples = [(i, seq) for i, seq in rows if seq.sampling_params.num_beams == 1]
        token_ids = self.groups.links.receive_tokens(len(samples))
        for (_, seq), token_id in zip(samples, token_ids):
            seq.token_ids.append(token_id)
        out.seq_ids = [step_input.seq_ids[i] for i, _ in samples]
        out.sampled_token_ids = token_ids

    def stage_seconds(self) -> tuple[float, float]:
        """Seconds this rank has spent in steps, and of those the seconds spent sending to and
        receiving from other pipeline stages (waiting for them included): how busy a stage is
        (`bench/pipeline_stages.py`)."""
        links = self.groups.links
        return self.step_s, links.comm_s if links is not None else 0.0

    def _sample(
        self,
        out: StepOutput,
        logits: torch.Tensor,  # [num_sampling, vocab], parallel to `rows`
        rows: list[tuple[int, WorkerSequence]],  # (index in the step, sequence)
        step_input: StepInput,
    ) -> None:
        """Sample the next token of each sampling row, or list a beam's candidates."""
        beams = [k for k, (_, seq) in enumerate(rows) if seq.sampling_params.num_beams > 1]
        samples = [k for k, (_, seq) in enumerate(rows) if seq.sampling_params.num_beams == 1]

        def sampling_rows(ks: list[int]) -> list[SamplingRow]:
            return [
                SamplingRow(
                    rows[k][1].sampling_params,
                    rows[k][1].token_ids,
                    rows[k][1].num_prompt_tokens,
                    self.eos_token_ids,
                    rows[k][1].grammar,
                )
                for k in ks
            ]

        if samples:
            batch = prepare_sampling_batch(
                sampling_rows(samples), vocab_size=self.vocab_size, device=self.device
            )
            # NOTE: without beams every row samples: no gathered copy of the logits.
            token_ids, logprobs = self.sampler.sample(logits[samples] if beams else logits, batch)
            for k, token_id in zip(samples, token_ids):
                rows[k][1].token_ids.append(token_id)
            out.seq_ids = [step_input.seq_ids[rows[k][0]] for k in samples]
            out.sampled_token_ids = token_ids
            out.logprobs = logprobs
            out.mask_s += batch.grammar.seconds if batch.grammar is not None else 0.0
        if beams:
            beam_rows = sampling_rows(beams)
            grammar = prepare_grammar_masks(
                beam_rows, vocab_size=self.vocab_size, device=self.device
            )
            out.beam_token_ids, out.beam_logprobs = beam_candidates(
                logits[beams], beam_rows, grammar=grammar
            )
            out.mask_s += grammar.seconds if grammar is not None else 0.0
            out.beam_seq_ids = [step_input.seq_ids[rows[k][0]] for k in beams]

    @property
    def num_sequences(self) -> int:
        return len(self.table)


def _num_prompt_logits(seq: WorkerSequence, num_computed: int, num_tokens: int) -> int:
    """Rows of a scheduled chunk whose logits score a prompt token (prompt_logprobs asked)."""
    if seq.sampling_params.prompt_logprobs is None:
        return 0
    return max(0, min(num_computed + num_tokens, seq.num_prompt_tokens - 1) - num_computed)
