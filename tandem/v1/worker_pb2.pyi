from tandem.v1 import serving_pb2 as _serving_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_COLOCATED: _ClassVar[Role]
    ROLE_PREFILL: _ClassVar[Role]
    ROLE_DECODE: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
ROLE_COLOCATED: Role
ROLE_PREFILL: Role
ROLE_DECODE: Role

class WorkerRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "priority", "output_token_ids", "predicted_output_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: _serving_pb2.SamplingParams
    priority: int
    output_token_ids: _containers.RepeatedScalarFieldContainer[int]
    predicted_output_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[_serving_pb2.SamplingParams, _Mapping]] = ..., priority: _Optional[int] = ..., output_token_ids: _Optional[_Iterable[int]] = ..., predicted_output_tokens: _Optional[int] = ...) -> None: ...

class KVHandle(_message.Message):
    __slots__ = ("instance_id", "transport", "address", "request_id", "num_blocks", "block_size", "lease_deadline_unix_ms")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    transport: str
    address: str
    request_id: str
    num_blocks: int
    block_size: int
    lease_deadline_unix_ms: int
    def __init__(self, instance_id: _Optional[str] = ..., transport: _Optional[str] = ..., address: _Optional[str] = ..., request_id: _Optional[str] = ..., num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., lease_deadline_unix_ms: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request", "lease_ms")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    request: WorkerRequest
    lease_ms: int
    def __init__(self, request: _Optional[_Union[WorkerRequest, _Mapping]] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("handle",)
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    handle: KVHandle
    def __init__(self, handle: _Optional[_Union[KVHandle, _Mapping]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request", "destination")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    request: WorkerRequest
    destination: KVHandle
    def __init__(self, request: _Optional[_Union[WorkerRequest, _Mapping]] = ..., destination: _Optional[_Union[KVHandle, _Mapping]] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token_id", "first_logprob", "first_top_logprobs", "first_text", "finished", "finish_reason", "num_cached_tokens", "queue_s", "prefill_s", "transfer_s", "kv_bytes", "kv_fallback")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    first_logprob: float
    first_top_logprobs: _serving_pb2.TopLogprobs
    first_text: str
    finished: bool
    finish_reason: _serving_pb2.FinishReason
    num_cached_tokens: int
    queue_s: float
    prefill_s: float
    transfer_s: float
    kv_bytes: int
    kv_fallback: str
    def __init__(self, first_token_id: _Optional[int] = ..., first_logprob: _Optional[float] = ..., first_top_logprobs: _Optional[_Union[_serving_pb2.TopLogprobs, _Mapping]] = ..., first_text: _Optional[str] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[_serving_pb2.FinishReason, str]] = ..., num_cached_tokens: _Optional[int] = ..., queue_s: _Optional[float] = ..., prefill_s: _Optional[float] = ..., transfer_s: _Optional[float] = ..., kv_bytes: _Optional[int] = ..., kv_fallback: _Optional[str] = ...) -> None: ...

class RecomputeRequest(_message.Message):
    __slots__ = ("request_id", "first_token_id", "first_logprob", "first_top_logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    first_token_id: int
    first_logprob: float
    first_top_logprobs: _serving_pb2.TopLogprobs
    def __init__(self, request_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., first_logprob: _Optional[float] = ..., first_top_logprobs: _Optional[_Union[_serving_pb2.TopLogprobs, _Mapping]] = ...) -> None: ...

class RecomputeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("request_id", "start_index", "request", "lease_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_INDEX_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    start_index: int
    request: WorkerRequest
    lease_ms: int
    def __init__(self, request_id: _Optional[str] = ..., start_index: _Optional[int] = ..., request: _Optional[_Union[WorkerRequest, _Mapping]] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("index", "token_ids", "text", "logprobs", "top_logprobs", "finished", "finish_reason", "num_prompt_tokens", "num_cached_tokens", "first_decode_s", "migrated", "request_id", "muxed_chunks", "queue_s", "prefill_s")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_DECODE_S_FIELD_NUMBER: _ClassVar[int]
    MIGRATED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MUXED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_S_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_logprobs: _containers.RepeatedCompositeFieldContainer[_serving_pb2.TopLogprobs]
    finished: bool
    finish_reason: _serving_pb2.FinishReason
    num_prompt_tokens: int
    num_cached_tokens: int
    first_decode_s: float
    migrated: Migrated
    request_id: str
    muxed_chunks: int
    queue_s: float
    prefill_s: float
    def __init__(self, index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[float]] = ..., top_logprobs: _Optional[_Iterable[_Union[_serving_pb2.TopLogprobs, _Mapping]]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[_Union[_serving_pb2.FinishReason, str]] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., first_decode_s: _Optional[float] = ..., migrated: _Optional[_Union[Migrated, _Mapping]] = ..., request_id: _Optional[str] = ..., muxed_chunks: _Optional[int] = ..., queue_s: _Optional[float] = ..., prefill_s: _Optional[float] = ...) -> None: ...

class OutputsRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class OutputBatch(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[TokenChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[TokenChunk, _Mapping]]] = ...) -> None: ...

class Migrated(_message.Message):
    __slots__ = ("instance_id", "address", "next_index")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NEXT_INDEX_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    address: str
    next_index: int
    def __init__(self, instance_id: _Optional[str] = ..., address: _Optional[str] = ..., next_index: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("check_integrity", "list_requests")
    CHECK_INTEGRITY_FIELD_NUMBER: _ClassVar[int]
    LIST_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    check_integrity: bool
    list_requests: bool
    def __init__(self, check_integrity: _Optional[bool] = ..., list_requests: _Optional[bool] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("instance_id", "role", "address", "kv_address", "state", "model", "total_blocks", "free_blocks", "reserved_blocks", "running", "waiting", "queued_prefill_tokens", "step_time_ms", "prefill_tokens_per_s", "block_size", "max_model_len", "vocab_size", "kv_transport", "dtype", "updated_unix_ms", "leases", "integrity_error", "high_priority_running", "high_priority_blocks", "head_waiting_blocks", "migrations_in_flight", "requests", "home_role", "mixed_prefill_tokens", "role_switches", "paused", "max_num_seqs", "decode_step_time_ms")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    KV_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    INTEGRITY_ERROR_FIELD_NUMBER: _ClassVar[int]
    HIGH_PRIORITY_RUNNING_FIELD_NUMBER: _ClassVar[int]
    HIGH_PRIORITY_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HEAD_WAITING_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    HOME_ROLE_FIELD_NUMBER: _ClassVar[int]
    MIXED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROLE_SWITCHES_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    role: Role
    address: str
    kv_address: str
    state: str
    model: str
    total_blocks: int
    free_blocks: int
    reserved_blocks: int
    running: int
    waiting: int
    queued_prefill_tokens: int
    step_time_ms: float
    prefill_tokens_per_s: float
    block_size: int
    max_model_len: int
    vocab_size: int
    kv_transport: str
    dtype: str
    updated_unix_ms: int
    leases: int
    integrity_error: str
    high_priority_running: int
    high_priority_blocks: int
    head_waiting_blocks: int
    migrations_in_flight: int
    requests: _containers.RepeatedCompositeFieldContainer[RunningRequest]
    home_role: Role
    mixed_prefill_tokens: int
    role_switches: int
    paused: int
    max_num_seqs: int
    decode_step_time_ms: float
    def __init__(self, instance_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., address: _Optional[str] = ..., kv_address: _Optional[str] = ..., state: _Optional[str] = ..., model: _Optional[str] = ..., total_blocks: _Optional[int] = ..., free_blocks: _Optional[int] = ..., reserved_blocks: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., queued_prefill_tokens: _Optional[int] = ..., step_time_ms: _Optional[float] = ..., prefill_tokens_per_s: _Optional[float] = ..., block_size: _Optional[int] = ..., max_model_len: _Optional[int] = ..., vocab_size: _Optional[int] = ..., kv_transport: _Optional[str] = ..., dtype: _Optional[str] = ..., updated_unix_ms: _Optional[int] = ..., leases: _Optional[int] = ..., integrity_error: _Optional[str] = ..., high_priority_running: _Optional[int] = ..., high_priority_blocks: _Optional[int] = ..., head_waiting_blocks: _Optional[int] = ..., migrations_in_flight: _Optional[int] = ..., requests: _Optional[_Iterable[_Union[RunningRequest, _Mapping]]] = ..., home_role: _Optional[_Union[Role, str]] = ..., mixed_prefill_tokens: _Optional[int] = ..., role_switches: _Optional[int] = ..., paused: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., decode_step_time_ms: _Optional[float] = ...) -> None: ...

class RunningRequest(_message.Message):
    __slots__ = ("request_id", "priority", "num_tokens", "num_output_tokens", "num_blocks", "running", "parked")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    PARKED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    priority: int
    num_tokens: int
    num_output_tokens: int
    num_blocks: int
    running: bool
    parked: bool
    def __init__(self, request_id: _Optional[str] = ..., priority: _Optional[int] = ..., num_tokens: _Optional[int] = ..., num_output_tokens: _Optional[int] = ..., num_blocks: _Optional[int] = ..., running: _Optional[bool] = ..., parked: _Optional[bool] = ...) -> None: ...

class MigrateRequest(_message.Message):
    __slots__ = ("request_id", "selector", "destination_instance_id", "destination_address", "reason", "recompute")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    selector: str
    destination_instance_id: str
    destination_address: str
    reason: str
    recompute: bool
    def __init__(self, request_id: _Optional[str] = ..., selector: _Optional[str] = ..., destination_instance_id: _Optional[str] = ..., destination_address: _Optional[str] = ..., reason: _Optional[str] = ..., recompute: _Optional[bool] = ...) -> None: ...

class MigrateResponse(_message.Message):
    __slots__ = ("request_id", "committed", "abort_reason", "message", "stages", "blocks_copied", "downtime_s", "total_s", "next_index")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    ABORT_REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_COPIED_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    NEXT_INDEX_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    committed: bool
    abort_reason: str
    message: str
    stages: int
    blocks_copied: int
    downtime_s: float
    total_s: float
    next_index: int
    def __init__(self, request_id: _Optional[str] = ..., committed: _Optional[bool] = ..., abort_reason: _Optional[str] = ..., message: _Optional[str] = ..., stages: _Optional[int] = ..., blocks_copied: _Optional[int] = ..., downtime_s: _Optional[float] = ..., total_s: _Optional[float] = ..., next_index: _Optional[int] = ...) -> None: ...

class MigrationStageRequest(_message.Message):
    __slots__ = ("request_id", "stage", "num_tokens", "request", "source_instance_id", "lease_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    SOURCE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    stage: int
    num_tokens: int
    request: WorkerRequest
    source_instance_id: str
    lease_ms: int
    def __init__(self, request_id: _Optional[str] = ..., stage: _Optional[int] = ..., num_tokens: _Optional[int] = ..., request: _Optional[_Union[WorkerRequest, _Mapping]] = ..., source_instance_id: _Optional[str] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class MigrationStageResponse(_message.Message):
    __slots__ = ("kv_address", "num_blocks")
    KV_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    kv_address: str
    num_blocks: int
    def __init__(self, kv_address: _Optional[str] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class CancelMigrationRequest(_message.Message):
    __slots__ = ("request_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SetStateRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    def __init__(self, state: _Optional[str] = ...) -> None: ...

class SetRoleRequest(_message.Message):
    __slots__ = ("role", "mixed_prefill_tokens", "reason")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MIXED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    role: Role
    mixed_prefill_tokens: int
    reason: str
    def __init__(self, role: _Optional[_Union[Role, str]] = ..., mixed_prefill_tokens: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...
