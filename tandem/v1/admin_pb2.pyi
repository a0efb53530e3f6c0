from tandem.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListInstancesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListInstancesResponse(_message.Message):
    __slots__ = ("instances",)
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[_worker_pb2.LoadReport]
    def __init__(self, instances: _Optional[_Iterable[_Union[_worker_pb2.LoadReport, _Mapping]]] = ...) -> None: ...

class AdminMigrateRequest(_message.Message):
    __slots__ = ("request_id", "to_instance_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TO_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    to_instance_id: str
    def __init__(self, request_id: _Optional[str] = ..., to_instance_id: _Optional[str] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("instance_id", "wait", "timeout_s", "undo")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    UNDO_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    wait: bool
    timeout_s: float
    undo: bool
    def __init__(self, instance_id: _Optional[str] = ..., wait: _Optional[bool] = ..., timeout_s: _Optional[float] = ..., undo: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("state", "remaining")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    state: str
    remaining: int
    def __init__(self, state: _Optional[str] = ..., remaining: _Optional[int] = ...) -> None: ...
