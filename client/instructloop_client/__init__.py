"""instructloop's light Python client: completions, streams and feedback over gRPC.

    from instructloop_client import Client

    with Client("127.0.0.1:50051", api_key="dev-key", user_id="alice") as client:
        c = client.complete("Write a haiku about autumn.", n=4, max_tokens=64)
        client.rank(c, order=[2, 0, 3, 1])  # indexes into c.choices, best first

`AsyncClient` is the same for asyncio. The generated stubs are `instructloop_client.v1`. It needs
only grpcio and protobuf (docs/CLIENT.md).
"""

from instructloop_client._calls import NO_RETRY, RetryPolicy
from instructloop_client.aio import AsyncClient, AsyncCompletionStream
from instructloop_client.client import Client, CompletionStream
from instructloop_client.types import (
    Choice,
    ChoiceDelta,
    Completion,
    CompletionChunk,
    FeedbackAck,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "NO_RETRY",
    "AsyncClient",
    "AsyncCompletionStream",
    "Choice",
    "ChoiceDelta",
    "Client",
    "Completion",
    "CompletionChunk",
    "CompletionStream",
    "FeedbackAck",
    "RetryPolicy",
    "Usage",
]
