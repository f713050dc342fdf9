import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from instructloop_client.v1 import completion_pb2 as _completion_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FlagReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLAG_REASON_UNSPECIFIED: _ClassVar[FlagReason]
    FLAG_REASON_UNSAFE: _ClassVar[FlagReason]
    FLAG_REASON_BROKEN: _ClassVar[FlagReason]
    FLAG_REASON_OTHER: _ClassVar[FlagReason]
FLAG_REASON_UNSPECIFIED: FlagReason
FLAG_REASON_UNSAFE: FlagReason
FLAG_REASON_BROKEN: FlagReason
FLAG_REASON_OTHER: FlagReason

class NextTaskRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class NextTaskResponse(_message.Message):
    __slots__ = ("has_task", "task")
    HAS_TASK_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    has_task: bool
    task: Task
    def __init__(self, has_task: _Optional[bool] = ..., task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "lease_id", "lease_expires", "model_version", "prompt", "messages", "candidates", "labels_needed", "labels_done")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    LABELS_NEEDED_FIELD_NUMBER: _ClassVar[int]
    LABELS_DONE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    lease_id: str
    lease_expires: _timestamp_pb2.Timestamp
    model_version: str
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[_completion_pb2.ChatMessage]
    candidates: _containers.RepeatedCompositeFieldContainer[Candidate]
    labels_needed: int
    labels_done: int
    def __init__(self, task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., lease_expires: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model_version: _Optional[str] = ..., prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_completion_pb2.ChatMessage, _Mapping]]] = ..., candidates: _Optional[_Iterable[_Union[Candidate, _Mapping]]] = ..., labels_needed: _Optional[int] = ..., labels_done: _Optional[int] = ...) -> None: ...

class Candidate(_message.Message):
    __slots__ = ("response_id", "text", "finish_reason")
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    response_id: str
    text: str
    finish_reason: str
    def __init__(self, response_id: _Optional[str] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class SubmitLabelRequest(_message.Message):
    __slots__ = ("user_id", "task_id", "lease_id", "ranked_response_ids", "ranks", "rating", "comment")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RANKED_RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    RATING_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    task_id: str
    lease_id: str
    ranked_response_ids: _containers.RepeatedScalarFieldContainer[str]
    ranks: _containers.RepeatedScalarFieldContainer[int]
    rating: int
    comment: str
    def __init__(self, user_id: _Optional[str] = ..., task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., ranked_response_ids: _Optional[_Iterable[str]] = ..., ranks: _Optional[_Iterable[int]] = ..., rating: _Optional[int] = ..., comment: _Optional[str] = ...) -> None: ...

class SubmitLabelResponse(_message.Message):
    __slots__ = ("feedback_id", "duplicate", "created", "rating_feedback_id", "labels_done")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    RATING_FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_DONE_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    duplicate: bool
    created: _timestamp_pb2.Timestamp
    rating_feedback_id: str
    labels_done: int
    def __init__(self, feedback_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., rating_feedback_id: _Optional[str] = ..., labels_done: _Optional[int] = ...) -> None: ...

class SkipTaskRequest(_message.Message):
    __slots__ = ("user_id", "task_id", "lease_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    task_id: str
    lease_id: str
    def __init__(self, user_id: _Optional[str] = ..., task_id: _Optional[str] = ..., lease_id: _Optional[str] = ...) -> None: ...

class FlagTaskRequest(_message.Message):
    __slots__ = ("user_id", "task_id", "lease_id", "reason", "comment")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    task_id: str
    lease_id: str
    reason: FlagReason
    comment: str
    def __init__(self, user_id: _Optional[str] = ..., task_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., reason: _Optional[_Union[FlagReason, str]] = ..., comment: _Optional[str] = ...) -> None: ...

class TaskReleased(_message.Message):
    __slots__ = ("task_id", "duplicate")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    duplicate: bool
    def __init__(self, task_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class GetQueueStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class QueueStats(_message.Message):
    __slots__ = ("available", "leased", "done", "flagged", "tasks", "labels", "labels_last_hour", "skips", "labels_per_task", "pairs_judged", "agreement", "labellers", "flags_by_reason")
    class FlagsByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    LEASED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LABELS_LAST_HOUR_FIELD_NUMBER: _ClassVar[int]
    SKIPS_FIELD_NUMBER: _ClassVar[int]
    LABELS_PER_TASK_FIELD_NUMBER: _ClassVar[int]
    PAIRS_JUDGED_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    LABELLERS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    available: int
    leased: int
    done: int
    flagged: int
    tasks: int
    labels: int
    labels_last_hour: int
    skips: int
    labels_per_task: int
    pairs_judged: int
    agreement: float
    labellers: _containers.RepeatedCompositeFieldContainer[LabellerStats]
    flags_by_reason: _containers.ScalarMap[str, int]
    def __init__(self, available: _Optional[int] = ..., leased: _Optional[int] = ..., done: _Optional[int] = ..., flagged: _Optional[int] = ..., tasks: _Optional[int] = ..., labels: _Optional[int] = ..., labels_last_hour: _Optional[int] = ..., skips: _Optional[int] = ..., labels_per_task: _Optional[int] = ..., pairs_judged: _Optional[int] = ..., agreement: _Optional[float] = ..., labellers: _Optional[_Iterable[_Union[LabellerStats, _Mapping]]] = ..., flags_by_reason: _Optional[_Mapping[str, int]] = ...) -> None: ...

class LabellerStats(_message.Message):
    __slots__ = ("labeller", "labels", "pairs_judged", "agreement")
    LABELLER_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_JUDGED_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    labeller: str
    labels: int
    pairs_judged: int
    agreement: float
    def __init__(self, labeller: _Optional[str] = ..., labels: _Optional[int] = ..., pairs_judged: _Optional[int] = ..., agreement: _Optional[float] = ...) -> None: ...
