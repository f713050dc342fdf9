"""What the client returns: completions, stream chunks and feedback acknowledgements.

Plain frozen dataclasses made from the protobuf answers, so an application's code does not
depend on the generated classes; the field names are those of protos/instructloop/v1/*.proto.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from instructloop_client.v1 import completion_pb2, feedback_pb2


def _time(msg: Any, field: str) -> datetime.datetime | None:
    if not msg.HasField(field):
        return None
    return getattr(msg, field).ToDatetime(tzinfo=datetime.UTC)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    """Summed over all choices."""


@dataclass(frozen=True, slots=True)
class Choice:
    """One candidate answer. `response_id` is the handle feedback refers to."""

    index: int
    response_id: str
    text: str
    finish_reason: str
    """"stop" (EOS or a stop string), "length" (max_tokens reached) or "abort"."""
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Completion:
    """The whole answer of `complete` (or a finished stream, `CompletionStream.completion`)."""

    completion_id: str
    model_version: str
    """The version that produced every token of every choice."""
    choices: tuple[Choice, ...]
    usage: Usage
    created: datetime.datetime | None
    logged: bool
    """False when the request opted out of logging: no feedback can refer to it then."""

    @property
    def text(self) -> str:
        """The first choice's text (the only one when n = 1)."""
        return self.choices[0].text if self.choices else ""

    @classmethod
    def from_proto(cls, msg: completion_pb2.CompletionResponse) -> Completion:
        return cls(
            completion_id=msg.completion_id,
            model_version=msg.model_version,
            choices=tuple(
                Choice(c.index, c.response_id, c.text, c.finish_reason, c.completion_tokens)
                for c in msg.choices
            ),
            usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens),
            created=_time(msg, "created"),
            logged=msg.logged,
        )


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    index: int
    response_id: str
    text: str
    """New text since this choice's previous delta."""
    finish_reason: str
    """Set in the choice's final delta only."""
    completion_tokens: int
    """Set in the choice's final delta only."""


@dataclass(frozen=True, slots=True)
class CompletionChunk:
    completion_id: str
    model_version: str
    """The version that produced this chunk's tokens (and, on the last chunk, all of them)."""
    choices: tuple[ChoiceDelta, ...]
    usage: Usage | None
    """Set on the stream's last chunk only, which the server sends after the completion is
    logged."""
    logged: bool
    restarted: bool
    """A hot swap aborted the completion and the server started it again on the new version
    (model_version): drop every delta received so far; response ids stay the same."""

    @classmethod
    def from_proto(cls, msg: completion_pb2.CompletionChunk) -> CompletionChunk:
        return cls(
            completion_id=msg.completion_id,
            model_version=msg.model_version,
            choices=tuple(
                ChoiceDelta(d.index, d.response_id, d.text, d.finish_reason, d.completion_tokens)
                for d in msg.choices
            ),
            usage=(
                Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens)
                if msg.HasField("usage")
                else None
            ),
            logged=msg.logged,
            restarted=msg.restarted,
        )


@dataclass(frozen=True, slots=True)
class FeedbackAck:
    feedback_id: str
    duplicate: bool
    """True when this acknowledges an earlier submission with the same idempotency key. A retry
    of the client's own (same call, a key the client made) is never reported as a duplicate."""
    created: datetime.datetime | None

    @classmethod
    def from_proto(cls, msg: feedback_pb2.FeedbackAck) -> FeedbackAck:
        return cls(msg.feedback_id, msg.duplicate, _time(msg, "created"))


class StreamAssembler:
    """Builds the Completion a stream describes, chunk by chunk (restarts included)."""

    def __init__(self) -> None:
        self._texts: dict[int, list[str]] = {}
        self._ids: dict[int, str] = {}
        self._finish: dict[int, tuple[str, int]] = {}
        self._last: CompletionChunk | None = None

    def add(self, chunk: CompletionChunk) -> None:
        if chunk.restarted:  # the earlier deltas came from weights no longer served
            self._texts.clear()
            self._finish.clear()
        for d in chunk.choices:
            self._ids[d.index] = d.response_id
            self._texts.setdefault(d.index, []).append(d.text)
            if d.finish_reason:
                self._finish[d.index] = (d.finish_reason, d.completion_tokens)
        self._last = chunk

    @property
    def finished(self) -> bool:
        return self._last is not None and self._last.usage is not None

    def completion(self) -> Completion:
        last = self._last
        if last is None or last.usage is None:
            raise RuntimeError("the stream has not finished: iterate it to its end first")
        choices = tuple(
            Choice(
                index=i,
                response_id=self._ids[i],
                text="".join(self._texts.get(i, [])),
                finish_reason=self._finish.get(i, ("", 0))[0],
                completion_tokens=self._finish.get(i, ("", 0))[1],
            )
            for i in sorted(self._ids)
        )
        return Completion(
            completion_id=last.completion_id,
            model_version=last.model_version,
            choices=choices,
            usage=last.usage,
            created=None,
            logged=last.logged,
        )
