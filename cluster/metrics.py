"""Prometheus metrics: vLLM's names and meanings (so llm-d, the Gateway API Inference Extension,
KEDA and vLLM dashboards read kvray unchanged), labelled with `model_name`, plus kvray's own
per replica and for the cluster.

Request metrics (tokens, finish reasons, latencies) are counted by the router as chunks reach
their streams; the load gauges and the engine counters are read from `ClusterStats` when
Prometheus scrapes, so `/metrics` and `GetClusterStatus` always agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvray.cluster.chunks import CompletionChunk
from kvray.cluster.stats import ClusterStats, ReplicaState
from kvray.cluster.streams import RequestStream
from kvray.workers.grammar_spec import GRAMMAR_KINDS
from kvray.workers.protocol import SamplingParams

# vLLM's buckets, with finer ones below 10 ms for small models on fast steps.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
                   30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort")


class ServingMetrics:
    def __init__(self, model_name: str, status: Callable[[], ClusterStats]) -> None:
        """`status()` is the cluster's state, read at every scrape."""
        prometheus_client.disable_created_metrics()  # as vLLM: no `_created` series
        self.registry = CollectorRegistry(auto_describe=False)
        label = {"model_name": model_name}

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, list(label), registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, list(label), registry=self.registry, buckets=buckets)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of requests that produced a token.").labels(**label)  # fmt: skip
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.").labels(**label)  # fmt: skip
        success = Counter(
            "vllm:request_success",
            "Samples finished, by finish reason (stop, length, abort).",
            [*label, "finished_reason"],
            registry=self.registry,
        )
        self.finished = {r: success.labels(**label, finished_reason=r) for r in FINISH_REASONS}
        constrained = Counter(
            "kvray:constrained_requests",
            "Requests admitted with a structured output, by kind (json_schema, json_object, "
            "regex, choice, grammar).",
            [*label, "kind"],
            registry=self.registry,
        )
        self.constrained = {k: constrained.labels(**label, kind=k) for k in GRAMMAR_KINDS}
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to the first token.", TTFT_BUCKETS).labels(**label)  # fmt: skip
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between two tokens of a sample.", ITL_BUCKETS).labels(**label)  # fmt: skip
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to a sample's last token.", REQUEST_BUCKETS).labels(**label)  # fmt: skip
        self.queue_time = histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled.", REQUEST_BUCKETS).labels(**label)  # fmt: skip
        self.registry.register(_ClusterCollector(model_name, status))

    def observe(self, stream: RequestStream, chunk: CompletionChunk, now: float) -> None:
        """Count one chunk that reached its stream (`now` on the router's clock)."""
        if chunk.token_ids:
            self.generation_tokens.inc(len(chunk.token_ids))
            if not stream.last_token_times:
                if not stream.is_ranked:
                    self.ttft.observe(now - stream.arrival_time)
                self.prompt_tokens.inc(chunk.num_prompt_tokens)
            last = stream.last_token_times.get(chunk.index)
            if last is not None:
                self.itl.observe(now - last)
            stream.last_token_times[chunk.index] = now
        if chunk.finish_reason is not None:
            self.finished[chunk.finish_reason.value].inc()
            self.e2e.observe(now - stream.arrival_time)
            if chunk.first_scheduled_time is not None:
                self.queue_time.observe(chunk.first_scheduled_time - stream.arrival_time)

    def observe_admitted(self, sampling_params: SamplingParams) -> None:
        """Count a request the router queued."""
        spec = sampling_params.structured_output
        if spec is not None:
            self.constrained[spec.kind].inc()

    def observe_aborted(self, num_samples: int) -> None:
        """Samples that ended without a final chunk (cancelled while waiting, or failed)."""
        self.finished["abort"].inc(num_samples)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return prometheus_client.generate_latest(self.registry)


class _ClusterCollector(Collector):
    """Gauges and engine counters from `ClusterStats`, computed at scrape time."""

    def __init__(self, model_name: str, status: Callable[[], ClusterStats]) -> None:
        self.model_name = model_name
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status()
        m = self.model_name

        def gauge(name: str, doc: str, value: float) -> Metric:
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([m], value)
            return family

        def counter(name: str, doc: str, value: float) -> Metric:
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([m], value)
            return family

        engines = [r for r in s.replicas if r.kv_blocks_total]
        used, total = (
            sum(r.kv_blocks_used for r in engines),
            sum(r.kv_blocks_total for r in engines),
        )
        waiting = s.queue_depth + sum(r.num_waiting for r in s.replicas)
        yield gauge(
            "vllm:num_requests_running", "Sequences running on all replicas.", s.num_running
        )
        yield gauge("vllm:num_requests_waiting", "Sequences queued on replicas plus requests waiting for one.", waiting)  # fmt: skip
        yield gauge("vllm:kv_cache_usage_perc", "KV blocks in use over all replicas (0-1).", used / total if total else 0.0)  # fmt: skip
        yield counter("vllm:num_preemptions", "Preemptions on all replicas.", s.num_preemptions)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.num_prefix_queries)  # fmt: skip
        yield counter("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.", s.num_prefix_hits)  # fmt: skip
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "KV cache geometry.", labels=["model_name", "block_size", "num_gpu_blocks"]
        )  # fmt: skip
        info.add_metric([m, str(s.block_size), str(total)], 1.0)
        yield info
        yield from self._cluster(s)
        yield from self._per_replica(s)

    def _cluster(self, s: ClusterStats) -> Iterator[Metric]:
        m = self.model_name
        replicas = GaugeMetricFamily("kvray:replicas", "Replicas by state.", labels=["model_name", "state"])  # fmt: skip
        for state in (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DRAINING):
            replicas.add_metric([m, state.value], sum(r.state is state for r in s.replicas))
        yield replicas
        for name, doc, value in (
            ("kvray:target_replicas", "Replica count the autoscaler last decided.", s.target_replicas),
            ("kvray:min_replicas", "Autoscaling lower bound.", s.min_replicas),
            ("kvray:max_replicas", "Autoscaling upper bound.", s.max_replicas),
            ("kvray:queue_depth", "Requests waiting for a replica.", s.queue_depth),
        ):  # fmt: skip
            family = GaugeMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([m], value)
            yield family
        decisions = CounterMetricFamily("kvray:scaling_decisions", "Scaling decisions by direction.", labels=["model_name", "direction"])  # fmt: skip
        decisions.add_metric([m, "up"], s.num_scale_ups)
        decisions.add_metric([m, "down"], s.num_scale_downs)
        yield decisions
        routing = CounterMetricFamily("kvray:routing_decisions", "Placements of new and waiting requests by what decided them.", labels=["model_name", "reason"])  # fmt: skip
        for reason in ("prefix", "load", "session", "only-ready"):
            routing.add_metric([m, reason], s.num_routing_decisions.get(reason, 0))
        yield routing
        for name, doc, value in (
            ("kvray:moved_requests", "Requests continued on another replica (failure, drain timeout).", s.num_moved_requests),
            ("kvray:rebalanced_requests", "Queued requests moved to a less busy replica.", s.num_rebalanced_requests),
            ("kvray:grammar_compiles", "Structured outputs the router compiled (a miss of its cache; refusals included).", s.num_grammar_compiles),
            ("kvray:grammar_cache_hits", "Structured outputs the router found compiled in its cache.", s.num_grammar_cache_hits),
        ):  # fmt: skip
            total = CounterMetricFamily(name, doc, labels=["model_name"])
            total.add_metric([m], value)
            yield total

    def _per_replica(self, s: ClusterStats) -> Iterator[Metric]:
        labels = ["model_name", "replica_id"]
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "num_requests_running": GaugeMetricFamily("kvray:replica_num_requests_running", "Sequences running on the replica.", labels=labels),
            "num_waiting": GaugeMetricFamily("kvray:replica_num_requests_waiting", "Sequences queued on the replica.", labels=labels),
            "kv_cache_usage": GaugeMetricFamily("kvray:replica_kv_cache_usage_perc", "The replica's KV blocks in use (0-1).", labels=labels),
            "num_preemptions": GaugeMetricFamily("kvray:replica_num_preemptions", "Preemptions since the replica started.", labels=labels),
            "prefix_cache_hit_rate": GaugeMetricFamily("kvray:replica_prefix_cache_hit_rate", "Of the prompt tokens looked up in the replica's prefix cache, the share served from it (0-1).", labels=labels),
            "step_seconds": CounterMetricFamily("kvray:replica_step_seconds", "The worker's time in steps (forward and sampling).", labels=labels),
            "mask_seconds": CounterMetricFamily("kvray:replica_grammar_mask_seconds", "Of the step time, the host's time making and applying structured output's masks.", labels=labels),
        }  # fmt: skip
        for r in s.replicas:
            key = [self.model_name, r.replica_id]
            families["num_requests_running"].add_metric(key, r.num_running)
            families["num_waiting"].add_metric(key, r.num_waiting)
            families["kv_cache_usage"].add_metric(key, r.kv_cache_usage)
            families["num_preemptions"].add_metric(key, r.num_preemptions)
            families["prefix_cache_hit_rate"].add_metric(key, r.prefix_cache_hit_rate)
            families["step_seconds"].add_metric(key, r.step_seconds)
            families["mask_seconds"].add_metric(key, r.mask_seconds)
        yield from families.values()
        yield from self._per_rank(s)

    def _per_rank(self, s: ClusterStats) -> Iterator[Metric]:
        labels = ["model_name", "replica_id", "rank"]
        info = GaugeMetricFamily("kvray:replica_rank_info", "A replica's worker processes (tensor-parallel ranks): device and node; always 1.", labels=[*labels, "device", "node"])  # fmt: skip
        weights = GaugeMetricFamily("kvray:replica_rank_weights_bytes", "Bytes of the model's weights a rank holds.", labels=labels)  # fmt: skip
        kv = GaugeMetricFamily("kvray:replica_rank_kv_cache_bytes", "Bytes of a rank's KV cache.", labels=labels)  # fmt: skip
        for r in s.replicas:
            for rank in r.ranks:
                key = [self.model_name, r.replica_id, str(rank.rank)]
                info.add_metric([*key, rank.device, rank.node], 1.0)
                weights.add_metric(key, rank.weights_bytes)
                kv.add_metric(key, rank.kv_cache_bytes)
        yield from (info, weights, kv)
