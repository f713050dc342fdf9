import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RatingScale(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RATING_SCALE_UNSPECIFIED: _ClassVar[RatingScale]
    RATING_SCALE_THUMB: _ClassVar[RatingScale]
    RATING_SCALE_LIKERT_7: _ClassVar[RatingScale]
RATING_SCALE_UNSPECIFIED: RatingScale
RATING_SCALE_THUMB: RatingScale
RATING_SCALE_LIKERT_7: RatingScale

class SubmitComparisonRequest(_message.Message):
    __slots__ = ("user_id", "idempotency_key", "chosen_response_id", "rejected_response_id", "tie")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    REJECTED_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    TIE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    idempotency_key: str
    chosen_response_id: str
    rejected_response_id: str
    tie: bool
    def __init__(self, user_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., chosen_response_id: _Optional[str] = ..., rejected_response_id: _Optional[str] = ..., tie: _Optional[bool] = ...) -> None: ...

class SubmitRankingRequest(_message.Message):
    __slots__ = ("user_id", "idempotency_key", "completion_id", "ranked_response_ids", "ranks")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ID_FIELD_NUMBER: _ClassVar[int]
    RANKED_RESPONSE_IDS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    idempotency_key: str
    completion_id: str
    ranked_response_ids: _containers.RepeatedScalarFieldContainer[str]
    ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, user_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., completion_id: _Optional[str] = ..., ranked_response_ids: _Optional[_Iterable[str]] = ..., ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class SubmitRatingRequest(_message.Message):
    __slots__ = ("user_id", "idempotency_key", "response_id", "scale", "score")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    idempotency_key: str
    response_id: str
    scale: RatingScale
    score: int
    def __init__(self, user_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., response_id: _Optional[str] = ..., scale: _Optional[_Union[RatingScale, str]] = ..., score: _Optional[int] = ...) -> None: ...

class FeedbackAck(_message.Message):
    __slots__ = ("feedback_id", "duplicate", "created")
    FEEDBACK_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    feedback_id: str
    duplicate: bool
    created: _timestamp_pb2.Timestamp
    def __init__(self, feedback_id: _Optional[str] = ..., duplicate: _Optional[bool] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
