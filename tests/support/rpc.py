"""gRPC stubs and request builders of the serving tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from instructloop.v1 import (
    completion_pb2,
    completion_pb2_grpc,
    feedback_pb2_grpc,
    model_pb2_grpc,
)

if TYPE_CHECKING:
    from tests.support.server import Served


@dataclass
class Stubs:
    completion: completion_pb2_grpc.CompletionServiceStub
    feedback: feedback_pb2_grpc.FeedbackServiceStub
    model: model_pb2_grpc.ModelServiceStub


def stubs(channel: grpc.aio.Channel) -> Stubs:
    return Stubs(
        completion_pb2_grpc.CompletionServiceStub(channel),
        feedback_pb2_grpc.FeedbackServiceStub(channel),
        model_pb2_grpc.ModelServiceStub(channel),
    )


def chat(*pairs: tuple[str, str], **kw: Any) -> completion_pb2.CompletionRequest:
    """A chat completion request of (role, content) messages."""
    return completion_pb2.CompletionRequest(
        messages=[completion_pb2.ChatMessage(role=r, content=c) for r, c in pairs], **kw
    )


async def small_completion(
    served: Served, channel: grpc.aio.Channel, n: int = 3
) -> completion_pb2.CompletionResponse:
    """A logged completion with `n` short candidates, for feedback to point at."""
    return await stubs(channel).completion.Complete(
        chat(("user", "Name a fruit."), n=n, max_tokens=4, user_id="alice"),
        metadata=served.user_md,
    )


async def rpc_error(coro: Any) -> grpc.aio.AioRpcError:
    """Await an RPC that must fail; return its error."""
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e
    raise AssertionError("the RPC succeeded but should have failed")
