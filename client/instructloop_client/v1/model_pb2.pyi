import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelVersion(_message.Message):
    __slots__ = ("version", "path", "parent", "source", "created", "data_snapshot", "metrics", "gate", "verified")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    DATA_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    version: str
    path: str
    parent: str
    source: str
    created: _timestamp_pb2.Timestamp
    data_snapshot: str
    metrics: _containers.ScalarMap[str, float]
    gate: str
    verified: str
    def __init__(self, version: _Optional[str] = ..., path: _Optional[str] = ..., parent: _Optional[str] = ..., source: _Optional[str] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., data_snapshot: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., gate: _Optional[str] = ..., verified: _Optional[str] = ...) -> None: ...

class GetServingModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServingModel(_message.Message):
    __slots__ = ("model", "serving_since", "live_version", "replica_id", "pinned", "fallback_reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVING_SINCE_FIELD_NUMBER: _ClassVar[int]
    LIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    model: ModelVersion
    serving_since: _timestamp_pb2.Timestamp
    live_version: str
    replica_id: str
    pinned: bool
    fallback_reason: str
    def __init__(self, model: _Optional[_Union[ModelVersion, _Mapping]] = ..., serving_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., live_version: _Optional[str] = ..., replica_id: _Optional[str] = ..., pinned: _Optional[bool] = ..., fallback_reason: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "live_version")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    live_version: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., live_version: _Optional[str] = ...) -> None: ...

class PromoteModelRequest(_message.Message):
    __slots__ = ("version", "force")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    version: str
    force: bool
    def __init__(self, version: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RollbackModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
