"""The labelling page and the operators' status page, on the HTTP API's port.

- `GET /label`: the page (plain HTML, one small script, no build step; serving/label_page/).
  It holds no data itself: the labeller signs in with a labeller key, which the page keeps in
  sessionStorage and sends as `Authorization: Bearer <key>` to its JSON API:
- `POST /label/api/next`, `/submit`, `/skip`, `/flag`; `GET /label/api/stats`: the JSON forms
  of LabelingService's requests and answers (protobuf's JSON mapping, field names as in
  labeling.proto), handled by the same core (serving/labeling_service.py's `Labeling`), so
  checks, leases and idempotency are the gRPC API's. Labeller and admin keys only: a user key
  gets 403, a missing or wrong key 401.
- `GET /status` and `GET /status/api`: read-only figures for operators (admin keys): the
  version served, the queue, labels per hour, agreement between labellers, and the last cycles
  with their gate figures, read from Redis (the cycle records' keys are feedback/keys.py's
  `LoopKeys`; serving does not import training).

Errors have the HTTP API's body (serving/openai/errors.py): `{"error": {"message", ...}}` with
the status that maps the gRPC one (400, 401, 403, 404, 409, 413, 503). Every call is counted
in the per-RPC metrics under its path.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import grpc
from fastapi import APIRouter, Request
from google.protobuf import json_format
from google.protobuf.message import Message
from redis.exceptions import RedisError
from starlette.responses import Response

from instructloop.feedback.keys import LoopKeys
from instructloop.serving.auth import Authenticator
from instructloop.serving.labeling_service import Labeling
from instructloop.serving.metrics import ServerMetrics
from instructloop.serving.openai.errors import HttpFailure, RouteCalls, json_response
from instructloop.serving.replica import ServedModel
from instructloop.v1 import labeling_pb2

M = TypeVar("M", bound=Message)

MAX_BODY_BYTES = 64 * 1024
"""Largest JSON body of the label API: a ranking of 16 ids and a comment fit many times."""

RECENT_CYCLES = 5
"""Cycles the status page lists."""

GATE_FIGURES = (
    "win_rate_rm",
    "win_rate_judge",
    "constraint_accuracy_candidate",
    "ptx_loss_candidate",
)
"""The evaluation figures the gate decides on (named by the evaluate step's output, as
`instructloop status` shows them)."""

ASSETS = {
    "label.js": "text/javascript",
    "label.css": "text/css",
    "status.js": "text/javascript",
}

PAGE_HEADERS = {
    # Everything the pages load comes from this server; no inline script, no framing.
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-store",
}


@dataclass
class LabelPageParts:
    """What the pages use: the labelling core and the server's own parts."""

    labeling: Labeling
    auth: Authenticator
    metrics: ServerMetrics
    served: ServedModel
    redis: Any
    """The feedback store's asyncio Redis client (decode_responses), for the status reads."""
    key_prefix: str
    replica_id: str


def parts_of(server: Any) -> LabelPageParts:
    """The pages' parts from a started InstructloopServer (serving/server.py)."""
    assert server.labeling is not None
    return LabelPageParts(
        labeling=server.labeling,
        auth=server.auth,
        metrics=server.metrics,
        served=server.served,
        redis=server.store.client,
        key_prefix=server.config.key_prefix,
        replica_id=server.config.replica_id,
    )


def _asset(name: str) -> bytes:
    return resources.files("instructloop.serving").joinpath("label_page", name).read_bytes()


def to_json(msg: Message) -> dict[str, Any]:
    """A message in protobuf's JSON mapping with its field names, 64-bit integers as numbers."""
    return json_format.MessageToDict(
        msg,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def _principal(auth: Authenticator, request: Request, roles: tuple[str, ...], what: str) -> str:
    """The caller's principal, if its key has one of `roles` ("" with authentication off)."""
    if not auth.enabled:
        return ""
    who = auth.identify(request.headers.get("authorization"))
    if who is None:
        raise HttpFailure(
            grpc.StatusCode.UNAUTHENTICATED,
            f"missing or invalid key: {what} needs the header `Authorization: Bearer <key>`",
        )
    role, principal = who
    if role not in roles:
        raise HttpFailure(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{what} needs a {' or '.join(roles)} key; this is a {role} key",
        )
    return principal


async def _body(request: Request, shape: type[M]) -> M:
    """The JSON body as the request message `shape` (unknown fields refused)."""
    declared = request.headers.get("content-length")
    too_large = HttpFailure(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the request body is larger than {MAX_BODY_BYTES} bytes",
        http_status=413,
    )
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise too_large
    msg = shape()
    if not raw.strip():
        return msg
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")
        json_format.ParseDict(data, msg)
    except (ValueError, json_format.ParseError) as e:
        raise HttpFailure(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request body: {e}") from None
    return msg


def _page(name: str) -> Response:
    return Response(_asset(name), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


def router(parts: LabelPageParts) -> APIRouter:
    r = APIRouter()
    core, auth = parts.labeling, parts.auth
    labellers = ("labeller", "admin")

    def route(path: str, method: str, handle: Callable[[Request], Awaitable[Response]]) -> None:
        calls = RouteCalls(parts.metrics, path)

        async def endpoint(request: Request) -> Response:
            return await calls.call(lambda: handle(request))

        r.add_api_route(path, endpoint, methods=[method])

    @r.get("/label")
    async def label_page() -> Response:
        return _page("label.html")

    @r.get("/status")
    async def status_page() -> Response:
        return _page("status.html")

    @r.get("/favicon.ico")
    async def favicon() -> Response:  # browsers ask for one; the pages have none
        return Response(status_code=204)

    @r.get("/label/assets/{name}")
    async def asset(name: str) -> Response:
        media = ASSETS.get(name)
        if media is None:
            return json_response({"error": {"message": f"no asset {name!r}"}}, 404)
        return Response(_asset(name), media_type=media, headers=PAGE_HEADERS)

    async def next_task(request: Request) -> Response:
        principal = _principal(auth, request, labellers, "the labelling API")
        body = await _body(request, labeling_pb2.NextTaskRequest)
        return json_response(to_json(await core.next_task(principal, body)))

    async def submit(request: Request) -> Response:
        principal = _principal(auth, request, labellers, "the labelling API")
        body = await _body(request, labeling_pb2.SubmitLabelRequest)
        return json_response(to_json(await core.submit_label(principal, body)))

    async def skip(request: Request) -> Response:
        principal = _principal(auth, request, labellers, "the labelling API")
        body = await _body(request, labeling_pb2.SkipTaskRequest)
        return json_response(to_json(await core.skip_task(principal, body)))

    async def flag(request: Request) -> Response:
        principal = _principal(auth, request, labellers, "the labelling API")
        body = await _body(request, labeling_pb2.FlagTaskRequest)
        return json_response(to_json(await core.flag_task(principal, body)))

    async def stats(request: Request) -> Response:
        _principal(auth, request, labellers, "the labelling API")
        return json_response(to_json(await core.queue_stats()))

    async def status(request: Request) -> Response:
        _principal(auth, request, ("admin",), "the status page")
        return json_response(await status_figures(parts))

    route("/label/api/next", "POST", next_task)
    route("/label/api/submit", "POST", submit)
    route("/label/api/skip", "POST", skip)
    route("/label/api/flag", "POST", flag)
    route("/label/api/stats", "GET", stats)
    route("/status/api", "GET", status)
    return r


async def status_figures(parts: LabelPageParts) -> dict[str, Any]:
    """What /status shows: the version served, the queue and the last cycles."""
    queue = to_json(await parts.labeling.queue_stats())
    try:
        cycles = await recent_cycles(parts.redis, parts.key_prefix, RECENT_CYCLES)
    except (RedisError, OSError) as e:
        raise HttpFailure(grpc.StatusCode.UNAVAILABLE, f"Redis is unavailable: {e}") from None
    mv = parts.served.model
    return {
        "serving": {
            "version": mv.version,
            "path": str(mv.path),
            "since": parts.served.since,
            "replica": parts.replica_id,
        },
        "queue": queue,
        "cycles": cycles,
    }


async def recent_cycles(client: Any, prefix: str, n: int) -> list[dict[str, Any]]:
    """The last `n` cycles, newest first, with their state and gate figures, read from the
    cycle records (training/loop/store.py writes them: `out:gate`, `out:evaluate`)."""
    keys = LoopKeys(prefix)
    ids = await client.zrevrange(keys.cycles, 0, n - 1)
    out = []
    for cid in ids:
        h = await client.hgetall(keys.cycle(cid))
        if not h:
            continue
        gate = json.loads(h.get("out:gate") or "{}")
        metrics = json.loads(h.get("out:evaluate") or "{}").get("metrics", {})
        out.append(
            {
                "id": h.get("id", cid),
                "state": h.get("state", ""),
                "trigger": h.get("trigger", ""),
                "created_at": float(h.get("created_at") or 0),
                "finished_at": float(h["finished_at"]) if h.get("finished_at") else None,
                "parent": h.get("parent_version", ""),
                "candidate": h.get("candidate_version", ""),
                "reason": h.get("reason", ""),
                "gate": {"passed": gate.get("passed"), "checks": gate.get("checks", {})}
                if gate
                else None,
                "figures": {k: metrics[k] for k in GATE_FIGURES if k in metrics},
            }
        )
    return out
