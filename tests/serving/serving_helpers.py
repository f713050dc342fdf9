"""Helpers of the serving tests: stubs, Redis state snapshots, a transformers reference."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc
import redis
from instructloop.feedback.keys import Keys
from instructloop.serving.testing import Served

from instructloop.v1 import (
    completion_pb2,
    completion_pb2_grpc,
    feedback_pb2_grpc,
    model_pb2_grpc,
)

PREFIX = "il:"


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


def redis_state(client: redis.Redis) -> dict[str, Any]:
    """Every key of the database with a digest of its content: equal states = nothing written.
    Rate-limit windows (Keys.rate) are left out: they are counters, not records, and one set by
    an earlier request can expire between two snapshots. So are the replicas' reports of what
    they serve (`models:replicas`): each server rewrites its own every few seconds, whatever the
    requests do."""
    state: dict[str, Any] = {}
    rate_prefix = Keys(PREFIX).rate_prefix
    replicas = f"{PREFIX}models:replicas"
    for key in sorted(client.scan_iter(count=1000)):
        if key.startswith(rate_prefix) or key == replicas:
            continue
        t = client.type(key)
        if t == "string":
            v: Any = client.get(key)
        elif t == "hash":
            v = client.hgetall(key)
        elif t == "stream":
            v = client.xlen(key)
        elif t == "zset":
            v = client.zrange(key, 0, -1, withscores=True)
        elif t == "list":
            v = client.lrange(key, 0, -1)
        elif t == "set":
            v = sorted(client.smembers(key))
        else:
            v = t
        state[key] = v
    return state


def stored_completion(client: redis.Redis, completion_id: str) -> dict[str, Any] | None:
    raw = client.hget(f"{PREFIX}cmpl:{completion_id}", "record")
    return None if raw is None else json.loads(raw)


async def rpc_error(coro: Any) -> grpc.aio.AioRpcError:
    """Await an RPC that must fail; return its error."""
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e
    raise AssertionError("the RPC succeeded but should have failed")
