"""The execution plan: which code computes a worker's forward and with which kernels, decided
once at load from the settings, the model and the device (`decide_plan`), then read by every
site that would otherwise probe: loading (`prepare_model`), the model runner, the decode path
and `WorkerInfo`. It decides and converts weights; it runs no step.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kvray.workers import cpu_kernels
from kvray.workers.attention import decode_kernel
from kvray.workers.device import cpu_flags
from kvray.workers.fused_projections import MODEL_TYPES as FUSED_MODEL_TYPES
from kvray.workers.fused_projections import fuse_projections
from kvray.workers.kv_cache import KVCacheSpec
from kvray.workers.llama_family import can_use_cpu_ops, is_family_model
from kvray.workers.models import is_own_model
from kvray.workers.models.layers import use_kernels
from kvray.workers.packed_linear import PackedLinear, can_pack, pack_linears
from kvray.workers.quantization import GROUP_SIZE, Int8Linear, quantize_linears
from kvray.workers.w8a8 import Int8ActLinear, quantize_linears_w8a8

if TYPE_CHECKING:
    from kvray.workers.config import WorkerConfig
    from kvray.workers.tensor_parallel import RankGroups

logger = logging.getLogger(__name__)

# NOTE: measured (bench/step_ab.py, SmolLM2-135M's shape, 2-core Zen 3 with AVX2 and no
# AVX-512): int8 in bf16 87 ms a step at one stream against bf16's 38, w8a8's 22
INT8_WITHOUT_AVX512 = (
    "quantization int8 on a CPU without AVX-512 runs kvray's row kernel, which is slower here "
    "than the unquantized model (it widens the weights with AVX2); quantization w8a8 has an "
    "AVX2 kernel and is the fast int8 choice on this CPU"
)

# implementation: which code computes the forward
OWN_MODEL = "kvray"  # kvray's own model (workers/models), any number of ranks
FAMILY_FORWARD = "transformers+kvray-forward"  # transformers' modules, llama_family's forward
TRANSFORMERS = "transformers"  # transformers' modules and forward
# linear: what multiplies the linear layers' weights
TORCH_LINEAR = "torch"  # F.linear on the model's dtype
BF16_KVRAY = "bf16-kvray"  # csrc/bf16_linear.cpp's panels (AVX512-BF16 without AMX)
BF16_ONEDNN = "bf16-onednn"  # oneDNN's blocked layout
INT8_PANELS = "int8-panels"  # csrc/int8_panel.cpp (bf16 on AVX512-BF16)
INT8_ROWS = "int8-rows"  # csrc/int8_linear.cpp, widened for oneDNN past a few rows
W8A8 = "w8a8"  # workers/w8a8.py: int8 weights x activations quantized per call
# attention: the kernel of decode steps' attention
KVRAY_CPU_ATTENTION = "kvray-cpu"  # csrc/paged_attention.cpp
TRITON_ATTENTION = "triton"  # workers/triton_attention.py
TORCH_ATTENTION = "torch"  # SDPA over gathered blocks
# decode: how an eager decode step runs its layers
ONE_CALL = "one-call"  # llama_family.DecodeStack: every layer in one C++ call
PER_LAYER = "per-layer"  # a Python call a layer (kvray's forward or model), or transformers'


@dataclass(frozen=True)
class ExecutionPlan:
    """How this rank computes its forward (`WorkerInfo.execution_plan` carries `as_dict`)."""

    dtype: torch.dtype
    implementation: str  # OWN_MODEL, FAMILY_FORWARD or TRANSFORMERS
    model_class: str  # e.g. "LlamaForCausalLM"
    fuses_projections: bool  # q/k/v and gate/up as one matmul each (workers/fused_projections.py)
    linear: str  # TORCH_LINEAR, BF16_KVRAY, BF16_ONEDNN, INT8_PANELS, INT8_ROWS or W8A8
    attention: str  # KVRAY_CPU_ATTENTION, TRITON_ATTENTION or TORCH_ATTENTION
    decode: str  # ONE_CALL or PER_LAYER: an eager decode step
    decode_graphs: bool  # decode steps replay a prepared forward (workers/decode_graphs.py)
    cpu_ops: bool  # kvray's C++ RMSNorm and rotary ops (bf16 on CPU; bitwise torch's)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    tensor_rank: int = 0  # this rank's place in its stage's tensor-parallel group
    stage_index: int = 0  # this rank's pipeline stage

    @property
    def is_own_model(self) -> bool:
        return self.implementation == OWN_MODEL

    @property
    def description(self) -> str:
        """`WorkerInfo.implementation`: "kvray LlamaForCausalLM", "transformers
        LlamaForCausalLM, kvray's forward" or "transformers GPT2LMHeadModel"."""
        if self.is_own_model:
            return f"kvray {self.model_class}"
        name = f"transformers {self.model_class}"
        return f"{name}, kvray's forward" if self.implementation == FAMILY_FORWARD else name

    def as_dict(self) -> dict[str, str]:
        """Every field as text, for `WorkerInfo` and the wire."""
        fields = asdict(self)
        return {key: str(value).lower() if isinstance(value, bool) else str(value)
                for key, value in fields.items()}  # fmt: skip


def decide_plan(
    model: Any,
    *,
    device: torch.device,
    dtype: torch.dtype,
    settings: WorkerConfig | None = None,
    groups: RankGroups | None = None,
) -> ExecutionPlan:
    """The plan for `model` as loaded (before `prepare_model` converts its layers). Without
    `settings` (a runner built directly, in tests) the linear kernel is read off the model's
    layers as they already are, and decode graphs are off."""
    own = is_own_model(model)
    config = model.config
    model_type = getattr(config.get_text_config(), "model_type", None)
    # NOTE: kvray's own layers hold q/k/v and gate/up fused already, whatever the dtype
    fuses = own or (dtype != torch.float32 and model_type in FUSED_MODEL_TYPES)
    if settings is None:
        linear = _linear_in(model)
    else:
        linear = _linear_for(device, dtype, quantization=settings.quantization)
    spec = model.kv_cache_spec(dtype) if own else KVCacheSpec.from_model_config(config, dtype)
    attention = _attention(dtype, device, spec.head_dim)
    implementation = _implementation(model)
    one_call = implementation == FAMILY_FORWARD and fuses and attention == KVRAY_CPU_ATTENTION
    one_call = one_call and _can_stack(config, linear)
    # NOTE: graphs trace transformers' forward (decode_graphs.py), with a paged decode kernel
    graphs = settings is not None and not own and attention != TORCH_ATTENTION
    graphs = graphs and _wants_graphs(settings, device)
    return ExecutionPlan(
        dtype=dtype,
        implementation=implementation,
        model_class=type(model).__name__,
        fuses_projections=fuses,
        linear=linear,
        attention=attention,
        decode=ONE_CALL if one_call else PER_LAYER,
        decode_graphs=graphs,
        cpu_ops=implementation != TRANSFORMERS and can_use_cpu_ops(dtype, device),
        tensor_parallel_size=1 if settings is None else settings.tensor_parallel_size,
        pipeline_parallel_size=1 if settings is None else settings.pipeline_parallel_size,
        tensor_rank=0 if groups is None else groups.tensor.rank,
        stage_index=0 if groups is None else groups.stage_index,
    )


def _implementation(model: Any) -> str:
    if is_own_model(model):
        return OWN_MODEL
    return FAMILY_FORWARD if is_family_model(model) else TRANSFORMERS


def _attention(dtype: torch.dtype, device: torch.device, head_dim: int) -> str:
    """The decode attention's kernel (`attention.decode_kernel` decides which applies)."""
    if decode_kernel(dtype, device, head_dim) is None:
        return TORCH_ATTENTION
    return KVRAY_CPU_ATTENTION if device.type == "cpu" else TRITON_ATTENTION


def _wants_graphs(settings: WorkerConfig | None, device: torch.device) -> bool:
    mode = "off" if settings is None else settings.decode_graphs
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def _linear_for(device: torch.device, dtype: torch.dtype, *, quantization: str | None) -> str:
    """The linear kernel the settings ask for on this device (checked by the worker:
    quantization runs on CPU only)."""
    if quantization == "w8a8":
        return W8A8
    if quantization == "int8":
        panels = dtype == torch.bfloat16 and cpu_kernels.int8_panel() is not None
        return INT8_PANELS if panels else INT8_ROWS
    if can_pack(device, dtype):
        kvray = "amx_bf16" not in cpu_flags() and cpu_kernels.bf16_linear() is not None
        return BF16_KVRAY if kvray else BF16_ONEDNN
    return TORCH_LINEAR


def _linear_in(model: nn.Module) -> str:
    """The linear kernel `model`'s layers already use (the first converted layer's)."""
    for module in model.modules():
        if type(module) is Int8Linear:
            return INT8_PANELS if module.layout == "panels" else INT8_ROWS
        if type(module) is Int8ActLinear:
            return W8A8
        if type(module) is PackedLinear:
            return BF16_KVRAY if module.kernel == "kvray" else BF16_ONEDNN
    return TORCH_LINEAR


def _can_stack(config: Any, linear: str) -> bool:
    """Whether `llama_family.DecodeStack` can run this model's decode steps: kvray's panels
    (bf16, int8 or w8a8) for every layer (their input widths suit the kernel), a SiLU MLP and
    the one-call op."""
    stackable = (BF16_KVRAY, INT8_PANELS, W8A8)
    if linear not in stackable or getattr(config, "hidden_act", None) != "silu":
        return False
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    widths = (config.hidden_size, config.intermediate_size, config.num_attention_heads * head_dim)
    unit = 2 if linear == BF16_KVRAY else GROUP_SIZE  # NOTE: what each kernel needs of in_features
    ops: list[object] = [
        cpu_kernels.decode_layers(),
        cpu_kernels.rotary_embedding(),
        cpu_kernels.rms_norm(),
    ]
    if linear == W8A8:
        ops.append(cpu_kernels.w8a8())  # its panels: without the kernel the layers keep rows
    return all(width % unit == 0 for width in widths) and all(op is not None for op in ops)


def prepare_model(model: nn.Module, plan: ExecutionPlan) -> None:
    """Convert `model`'s layers as `plan` says (in place): fuse sibling projections, then
    quantize to int8 (weight-only or w8a8) or pack for the bf16 kernels. kvray's own model converts each rank's
    shards (`layers.use_kernels`): the kernels are sized by the matrix they get."""
    if plan.is_own_model:
        _prepare_shards(model, plan)
        if plan.cpu_ops:
            model.use_cpu_ops()  # type: ignore[operator]  # models.CausalLM
        return
    if plan.fuses_projections:
        logger.info("fused %d sets of sibling projections", fuse_projections(model))
    if plan.linear in (INT8_PANELS, INT8_ROWS):
        logger.info("quantized %d linear layers to int8", quantize_linears(model))
        if plan.linear == INT8_ROWS and "avx512f" not in cpu_flags():
            logger.warning(INT8_WITHOUT_AVX512)
    elif plan.linear == W8A8:
        logger.info("quantized %d linear layers to w8a8", quantize_linears_w8a8(model))
    elif plan.linear in (BF16_KVRAY, BF16_ONEDNN):
        counts = pack_linears(model)
        logger.info(
            "packed bf16 linear layers: %s",
            ", ".join(f"{n} for {kernel}" for kernel, n in sorted(counts.items())),
        )


def _prepare_shards(model: nn.Module, plan: ExecutionPlan) -> None:
    """kvray's own model: each linear layer's shard (and the output layer's) in the plan's
    kernel. An int8 or w8a8 layer needs whole groups of input features (`can_quantize`'s
    rule); a shard whose width is not one keeps its weights."""
    if plan.linear in (INT8_PANELS, INT8_ROWS):
        count = use_kernels(model, Int8Linear, can_use=_is_whole_groups)
        logger.info("quantized %d linear layers of this rank's shard to int8", count)
    elif plan.linear == W8A8:
        count = use_kernels(model, Int8ActLinear, can_use=_is_whole_groups)
        logger.info("quantized %d linear layers of this rank's shard to w8a8", count)
    elif plan.linear in (BF16_KVRAY, BF16_ONEDNN):
        count = use_kernels(model, PackedLinear, can_use=lambda width: True)
        logger.info("packed %d bf16 linear layers of this rank's shard", count)


def _is_whole_groups(width: int) -> bool:
    return width % GROUP_SIZE == 0
