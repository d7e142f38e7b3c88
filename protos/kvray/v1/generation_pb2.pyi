from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = (
        "frequency_penalty",
        "min_p",
        "n",
        "presence_penalty",
        "repetition_penalty",
        "seed",
        "temperature",
        "top_k",
        "top_p",
    )
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    n: int
    def __init__(
        self,
        temperature: float | None = ...,
        top_k: int | None = ...,
        top_p: float | None = ...,
        min_p: float | None = ...,
        repetition_penalty: float | None = ...,
        presence_penalty: float | None = ...,
        frequency_penalty: float | None = ...,
        seed: int | None = ...,
        n: int | None = ...,
    ) -> None: ...

class StoppingCriteria(_message.Message):
    __slots__ = (
        "ignore_eos",
        "include_stop_str_in_output",
        "max_tokens",
        "min_tokens",
        "stop",
        "stop_token_ids",
    )
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_STR_IN_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    min_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    include_stop_str_in_output: bool
    def __init__(
        self,
        max_tokens: int | None = ...,
        min_tokens: int | None = ...,
        stop: _Iterable[str] | None = ...,
        stop_token_ids: _Iterable[int] | None = ...,
        ignore_eos: bool | None = ...,
        include_stop_str_in_output: bool | None = ...,
    ) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Iterable[int] | None = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = (
        "logprobs",
        "request_id",
        "sampling",
        "session_id",
        "stopping",
        "text",
        "token_ids",
    )
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    token_ids: TokenIds
    sampling: SamplingParams
    stopping: StoppingCriteria
    logprobs: int
    session_id: str
    def __init__(
        self,
        request_id: str | None = ...,
        text: str | None = ...,
        token_ids: TokenIds | _Mapping | None = ...,
        sampling: SamplingParams | _Mapping | None = ...,
        stopping: StoppingCriteria | _Mapping | None = ...,
        logprobs: int | None = ...,
        session_id: str | None = ...,
    ) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("logprob", "token_id", "top_logprobs", "top_token_ids")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(
        self,
        token_id: int | None = ...,
        logprob: float | None = ...,
        top_token_ids: _Iterable[int] | None = ...,
        top_logprobs: _Iterable[float] | None = ...,
    ) -> None: ...

class Usage(_message.Message):
    __slots__ = ("completion_tokens", "prompt_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    def __init__(
        self, prompt_tokens: int | None = ..., completion_tokens: int | None = ...
    ) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = (
        "finish_reason",
        "index",
        "logprobs",
        "request_id",
        "stop_string",
        "stop_token_id",
        "text",
        "token_ids",
        "usage",
    )
    class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FINISH_REASON_UNSPECIFIED: _ClassVar[GenerateResponse.FinishReason]
        STOP: _ClassVar[GenerateResponse.FinishReason]
        LENGTH: _ClassVar[GenerateResponse.FinishReason]
        ABORT: _ClassVar[GenerateResponse.FinishReason]

    FINISH_REASON_UNSPECIFIED: GenerateResponse.FinishReason
    STOP: GenerateResponse.FinishReason
    LENGTH: GenerateResponse.FinishReason
    ABORT: GenerateResponse.FinishReason
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    finish_reason: GenerateResponse.FinishReason
    usage: Usage
    stop_string: str
    stop_token_id: int
    def __init__(
        self,
        request_id: str | None = ...,
        index: int | None = ...,
        token_ids: _Iterable[int] | None = ...,
        text: str | None = ...,
        logprobs: _Iterable[TokenLogprob | _Mapping] | None = ...,
        finish_reason: GenerateResponse.FinishReason | str | None = ...,
        usage: Usage | _Mapping | None = ...,
        stop_string: str | None = ...,
        stop_token_id: int | None = ...,
    ) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: str | None = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Iterable[int] | None = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("dtype", "eos_token_ids", "has_tokenizer", "max_model_len", "model", "vocab_size")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HAS_TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    has_tokenizer: bool
    dtype: str
    def __init__(
        self,
        model: str | None = ...,
        max_model_len: int | None = ...,
        vocab_size: int | None = ...,
        eos_token_ids: _Iterable[int] | None = ...,
        has_tokenizer: bool | None = ...,
        dtype: str | None = ...,
    ) -> None: ...

class GetClusterStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = (
        "device",
        "kv_blocks_total",
        "kv_blocks_used",
        "num_finished_requests",
        "num_preemptions",
        "num_running",
        "num_waiting",
        "replica_id",
        "state",
    )
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_FINISHED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    state: str
    device: str
    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    num_finished_requests: int
    def __init__(
        self,
        replica_id: str | None = ...,
        state: str | None = ...,
        device: str | None = ...,
        num_waiting: int | None = ...,
        num_running: int | None = ...,
        kv_blocks_used: int | None = ...,
        kv_blocks_total: int | None = ...,
        num_preemptions: int | None = ...,
        num_finished_requests: int | None = ...,
    ) -> None: ...

class ClusterStatus(_message.Message):
    __slots__ = ("num_running", "queue_depth", "replicas")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    queue_depth: int
    num_running: int
    def __init__(
        self,
        replicas: _Iterable[ReplicaStatus | _Mapping] | None = ...,
        queue_depth: int | None = ...,
        num_running: int | None = ...,
    ) -> None: ...
