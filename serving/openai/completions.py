"""Completion routes: `POST /v1/chat/completions` and `POST /v1/completions`, whole or streamed
as server-sent events, and `GET /v1/models`.

A request becomes the gRPC CompletionRequest (schemas.py) and runs through the same core as
gRPC (serving/completion_service.py's `Completions`): the same checks, the completion logged
before it is answered, the version that produced it named. A stream's headers are sent once the
engine has admitted the request, so a refused request gets a plain error response (and its
status), and `x-instructloop-model-version` names the version it was admitted on; a hot swap
that restarts it later says so in the stream (`restarted`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from instructloop.serving.completion_service import (
    SERVICE_NAME,
    StreamAdmitted,
    StreamEvent,
    StreamText,
)
from instructloop.serving.openai.errors import SSE_DONE, RouteCalls, json_response, sse_event
from instructloop.serving.openai.parts import ApiParts, admit_completion, authorize, read_body
from instructloop.serving.openai.responses import (
    CHAT,
    TEXT,
    VERSION_HEADER,
    ChunkWriter,
    completion_body,
)
from instructloop.serving.openai.schemas import ChatCompletionRequest, CompletionRequest

CHAT_ROUTE = "/v1/chat/completions"
TEXT_ROUTE = "/v1/completions"
MODELS_ROUTE = "/v1/models"
COMPLETE = f"/{SERVICE_NAME}/Complete"
"""The RPC the routes stand for: a key may call them when it may call Complete."""


def router(parts: ApiParts) -> APIRouter:
    r = APIRouter()
    chat_calls = RouteCalls(parts.metrics, CHAT_ROUTE)
    text_calls = RouteCalls(parts.metrics, TEXT_ROUTE)
    model_calls = RouteCalls(parts.metrics, MODELS_ROUTE)

    @r.post(CHAT_ROUTE)
    async def chat_completions(request: Request) -> Response:
        return await chat_calls.call(lambda: _complete(parts, request, CHAT))

    @r.post(TEXT_ROUTE)
    async def completions(request: Request) -> Response:
        return await text_calls.call(lambda: _complete(parts, request, TEXT))

    @r.get(MODELS_ROUTE)
    async def models(request: Request) -> Response:
        return await model_calls.call(lambda: _models(parts, request))

    return r


async def _complete(parts: ApiParts, request: Request, kind: str) -> Response:
    # Checked before the body says whether it streams: Complete and StreamComplete allow the
    # same keys.
    principal = authorize(parts, request, COMPLETE)
    shape = ChatCompletionRequest if kind == CHAT else CompletionRequest
    body = await read_body(request, shape, parts.config.max_receive_message_bytes)
    proto = body.to_proto()
    await admit_completion(parts, principal)
    core = parts.completions
    run = await core.start(proto)
    if not body.stream:
        version = await core.complete(run)
        return json_response(completion_body(kind, run, version), headers={VERSION_HEADER: version})
    events = core.stream(run)
    first = await anext(events)  # the admission; an error before it is a plain error response
    assert isinstance(first, StreamAdmitted)
    writer = ChunkWriter(kind, run, body.include_usage)
    return StreamingResponse(
        _sse(events, first.version, writer),
        media_type="text/event-stream",
        headers={VERSION_HEADER: first.version},
    )


async def _sse(
    events: AsyncGenerator[StreamEvent, None], version: str, w: ChunkWriter
) -> AsyncIterator[bytes]:
    """The stream's events as OpenAI chunks, then `[DONE]`. An error is written into the
    stream by the route's RouteCalls."""
    try:
        # The events of one engine step go out in one write.
        opening = w.opening(version)
        if opening:
            yield b"".join(map(sse_event, opening))
        async for ev in events:
            if isinstance(ev, StreamText):
                yield b"".join(map(sse_event, w.text(ev.version, ev.texts)))
            elif isinstance(ev, StreamAdmitted):
                if ev.restarted:
                    yield sse_event(w.restarted(ev.version))
            else:
                yield b"".join(map(sse_event, w.end(ev.version, ev.held))) + SSE_DONE
    finally:  # the client went away: the engine request is aborted now, not when collected
        await events.aclose()


async def _models(parts: ApiParts, request: Request) -> Response:
    """The version this replica serves, the one model this server answers with."""
    authorize(parts, request, COMPLETE)  # whoever may complete may see what answers
    engine, mv = parts.engine, parts.served.model
    version = engine.model_version
    card = {
        "id": version,
        "object": "model",
        "created": int(mv.created_at if mv.version == version else engine.serving_since),
        "owned_by": "instructloop",
        "parent": (mv.parent if mv.version == version else None) or None,
        "max_model_len": engine.max_model_len,
    }
    return json_response({"object": "list", "data": [card]})
