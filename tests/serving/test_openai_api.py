"""The OpenAI-compatible HTTP API (serving/openai/) with the official `openai` SDK, against a real
server on the session's vLLM engine and real Redis: chat with n = 4, text completions, streams
with usage, models, feedback ranked over HTTP and found in `feedback export`, a stream restarted
by a hot swap, and errors (bad keys, bad parameters) in OpenAI's shape that store nothing.

The server runs in the test's own event loop, so the tests use the SDK's async client.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import pytest_asyncio
import redis

from instructloop.cli import build_parser
from instructloop.cli import main as cli_main
from instructloop.cli.serve import UP_HTTP_PORT, config_from_args
from instructloop.cli.up import up_http_port
from instructloop.registry import ModelRegistry
from instructloop.serving.errors import RpcFailure
from instructloop.serving.openai.errors import HttpFailure, failure_body, failure_status
from instructloop.serving.openai.schemas import ChatCompletionRequest, CompletionRequest
from tests.support.redis_state import flushed_client, redis_state, stored_completion
from tests.support.server import ADMIN_KEY, USER_KEY, Served, running_server

VERSION_HEADER = "x-instructloop-model-version"
CHAT = [{"role": "user", "content": "Name a fruit."}]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
"""A raw prompt the model continues for hundreds of tokens (greedy): a long stream to swap under."""


@pytest_asyncio.fixture(scope="module")
async def api(served: Served, serving_redis_url: str) -> AsyncIterator[Served]:
    """A second server on the session's engine and Redis, with the HTTP API on a free port."""
    async with running_server(
        None,
        serving_redis_url,
        engine=served.engine,
        http_port=0,
        follow_live=False,
        replica_id="openai-api",
    ) as s:
        yield s


def base_url(s: Served) -> str:
    assert s.server.http_url is not None
    return f"{s.server.http_url}/v1"


def sdk(s: Served, key: str = USER_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url(s), api_key=key, max_retries=0, timeout=300)


def requests_total(s: Served, route: str, code: str) -> float:
    v = s.server.metrics.registry.get_sample_value(
        "instructloop_requests_total", {"rpc": route, "code": code}
    )
    return v or 0.0


async def post(s: Served, path: str, body: Any, key: str | None = USER_KEY) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=base_url(s), timeout=60) as c:
        if isinstance(body, bytes):
            headers["content-type"] = "application/json"
            return await c.post(path, content=body, headers=headers)
        return await c.post(path, json=body, headers=headers)


# --- completions -------------------------------------------------------------------------------


@pytest.mark.engine
async def test_chat_with_n_4(api: Served, serving_redis: redis.Redis) -> None:
    ok_before = requests_total(api, "/v1/chat/completions", "OK")
    raw = await sdk(api).chat.completions.with_raw_response.create(
        model="anything", messages=CHAT, n=4, max_tokens=8, user="alice", seed=7
    )
    resp = raw.parse()
    version = api.engine.model_version
    assert raw.headers[VERSION_HEADER] == version
    assert resp.model == version and resp.model_extra is not None
    assert resp.model_extra["model_version"] == version
    assert resp.model_extra["completion_id"] == resp.id and resp.id.startswith("cmpl-")
    assert resp.object == "chat.completion"
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    ids = [c.model_extra["response_id"] for c in resp.choices]  # type: ignore[index]
    assert len(set(ids)) == 4 and all(i.startswith("resp-") for i in ids)
    for c in resp.choices:
        assert c.message.role == "assistant" and c.finish_reason in ("stop", "length")
    # Logged before it was answered, exactly as answered.
    rec = stored_completion(serving_redis, resp.id)
    assert rec is not None and rec["model_version"] == version and rec["user_id"] == "alice"
    assert rec["messages"] == CHAT and rec["sampling"]["seed"] == 7
    assert [r["response_id"] for r in rec["responses"]] == ids
    assert [r["text"] for r in rec["responses"]] == [c.message.content for c in resp.choices]
    assert resp.usage is not None
    assert resp.usage.completion_tokens == sum(r["completion_tokens"] for r in rec["responses"])
    assert resp.usage.prompt_tokens == len(rec["prompt_token_ids"])
    assert requests_total(api, "/v1/chat/completions", "OK") == ok_before + 1


@pytest.mark.engine
async def test_text_completion(api: Served, serving_redis: redis.Redis) -> None:
    resp = await sdk(api).completions.create(
        model="x", prompt="The capital of France is", max_tokens=5, temperature=0, stop=["\n\n"]
    )
    assert resp.object == "text_completion" and resp.model == api.engine.model_version
    (choice,) = resp.choices
    rec = stored_completion(serving_redis, resp.id)
    assert rec is not None and rec["prompt"] == "The capital of France is"
    assert rec["messages"] is None and rec["sampling"]["stop"] == ["\n\n"]
    assert rec["responses"][0]["response_id"] == choice.model_extra["response_id"]  # type: ignore[index]
    assert rec["responses"][0]["text"] == choice.text


@pytest.mark.engine
async def test_models_lists_the_served_version(api: Served) -> None:
    models = await sdk(api).models.list()
    (m,) = models.data
    assert m.id == api.engine.model_version and m.owned_by == "instructloop"


def _collect(chunks: list[Any]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            piece = c.delta.content if hasattr(c, "delta") else c.text
            texts[c.index] = texts.get(c.index, "") + (piece or "")
    return texts


@pytest.mark.engine
async def test_chat_stream_with_usage(api: Served, serving_redis: redis.Redis) -> None:
    client = sdk(api)
    raw = await client.chat.completions.with_raw_response.create(
        model="m",
        messages=CHAT,
        n=2,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    version = api.engine.model_version
    assert raw.headers[VERSION_HEADER] == version
    chunks = [ch async for ch in raw.parse()]
    assert all(ch.model == version and ch.object == "chat.completion.chunk" for ch in chunks)
    assert {c.delta.role for c in chunks[0].choices} == {"assistant"}  # the opening
    *body, last = chunks
    assert last.choices == [] and last.usage is not None  # the usage chunk comes last
    assert all(ch.usage is None for ch in body)
    rec = stored_completion(serving_redis, last.id)
    assert rec is not None
    by_index = {r["index"]: r for r in rec["responses"]}
    texts = _collect(body)
    assert texts == {i: r["text"] for i, r in by_index.items()}
    finishes = {c.index: c.finish_reason for ch in body for c in ch.choices if c.finish_reason}
    assert finishes == {i: r["finish_reason"] for i, r in by_index.items()}
    for ch in body:
        for c in ch.choices:
            assert c.model_extra["response_id"] == by_index[c.index]["response_id"]  # type: ignore[index]
    assert last.usage.completion_tokens == sum(r["completion_tokens"] for r in by_index.values())
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens


@pytest.mark.engine
async def test_text_stream_without_usage(api: Served, serving_redis: redis.Redis) -> None:
    stream = await sdk(api).completions.create(
        model="m", prompt=COUNTING, max_tokens=10, temperature=0, stream=True
    )
    chunks = [ch async for ch in stream]
    assert all(ch.usage is None for ch in chunks)
    rec = stored_completion(serving_redis, chunks[0].id)
    assert rec is not None
    assert _collect(chunks) == {0: rec["responses"][0]["text"]}
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.engine
async def test_a_client_that_goes_away_stops_its_stream(
    api: Served, serving_redis: redis.Redis
) -> None:
    """Closing the connection mid-stream aborts the engine request; nothing is logged and the
    call is counted as CANCELLED."""
    route = "/v1/completions"
    cancelled = requests_total(api, route, "CANCELLED")
    body = {"prompt": COUNTING, "max_tokens": 400, "temperature": 0, "stream": True}
    headers = {"authorization": f"Bearer {USER_KEY}"}
    async with (
        httpx.AsyncClient(base_url=base_url(api), timeout=60) as c,
        c.stream("POST", "/completions", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.aiter_lines()
        first = json.loads((await anext(lines)).removeprefix("data: "))
    deadline = time.monotonic() + 30
    while api.engine.num_unfinished_requests() or requests_total(api, route, "CANCELLED") == 0:
        assert time.monotonic() < deadline, "the engine request was not aborted"
        await asyncio.sleep(0.05)
    assert requests_total(api, route, "CANCELLED") == cancelled + 1
    assert (
        api.server.metrics.registry.get_sample_value(
            "instructloop_requests_in_flight", {"rpc": route}
        )
        == 0
    )
    assert stored_completion(serving_redis, first["id"]) is None


# --- feedback ----------------------------------------------------------------------------------


@pytest.mark.engine
async def test_ranked_over_http_and_found_in_export(
    api: Served, serving_redis_url: str, serving_redis: redis.Redis, tmp_path: Path
) -> None:
    resp = await sdk(api).chat.completions.create(model="m", messages=CHAT, n=4, max_tokens=6)
    ids = [c.model_extra["response_id"] for c in resp.choices]  # type: ignore[index]
    order = ids[::-1]
    body = {
        "completion_id": resp.id,
        "ranked_response_ids": order,
        "user_id": "rater",
        "idempotency_key": "http-rank-1",
    }
    # Through the SDK's own client (as docs/OPENAI-API.md shows it), then with plain HTTP.
    ack = await sdk(api).post("/feedback/rankings", body=body, cast_to=object)
    assert isinstance(ack, dict)
    assert ack["feedback_id"].startswith("fb-") and ack["duplicate"] is False
    again = await post(api, "/feedback/rankings", body)  # a retry: the same ack, counted once
    assert again.status_code == 200 and again.json() == {**ack, "duplicate": True}
    # The same key for another judgement is a conflict, as over gRPC (ALREADY_EXISTS).
    conflict = await post(api, "/feedback/rankings", {**body, "ranked_response_ids": ids})
    assert conflict.status_code == 409, conflict.text
    assert conflict.json()["error"]["code"] == "already_exists"

    comparison = await post(
        api,
        "/feedback/comparisons",
        {"chosen_response_id": ids[0], "rejected_response_id": ids[1], "user_id": "rater"},
    )
    assert comparison.status_code == 200, comparison.text
    rating = await post(
        api,
        "/feedback/ratings",
        {"response_id": ids[2], "scale": "likert7", "score": 6, "user_id": "rater"},
    )
    assert rating.status_code == 200, rating.text
    h = serving_redis.hgetall(f"il:fb:{rating.json()['feedback_id']}")
    assert h["kind"] == "rating" and '"likert7"' in h["data"]

    out = tmp_path / "export"
    rc = await asyncio.to_thread(
        cli_main, ["feedback", "export", "--out", str(out), "--redis-url", serving_redis_url]
    )
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert ack["feedback_id"] in manifest["feedback_ids"]
    assert comparison.json()["feedback_id"] in manifest["feedback_ids"]
    groups = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    (mine,) = [g for g in groups if g["feedback_id"] == ack["feedback_id"]]
    assert mine["completion_id"] == resp.id and mine["response_ids"] == order
    assert mine["model_version"] == resp.model and mine["ranks"] == [1, 2, 3, 4]
    texts = {c.model_extra["response_id"]: c.message.content for c in resp.choices}  # type: ignore[index]
    assert mine["responses"] == [texts[i] for i in order]


@pytest.mark.engine
async def test_bad_feedback_is_refused_and_stores_nothing(
    api: Served, serving_redis: redis.Redis
) -> None:
    resp = await sdk(api).chat.completions.create(model="m", messages=CHAT, n=2, max_tokens=4)
    a, b = (c.model_extra["response_id"] for c in resp.choices)  # type: ignore[index]
    before = redis_state(serving_redis)
    u = {"user_id": "rater"}
    cases: list[tuple[str, Any, int]] = [
        ("/feedback/rankings", {**u, "completion_id": resp.id, "ranked_response_ids": [a]}, 400),
        (
            "/feedback/rankings",
            {**u, "completion_id": "cmpl-0", "ranked_response_ids": [a, b]},
            404,
        ),
        ("/feedback/rankings", {**u, "completion_id": resp.id}, 400),  # a missing field
        ("/feedback/rankings", {"completion_id": resp.id, "ranked_response_ids": [a, b]}, 400),
        (
            "/feedback/rankings",
            {**u, "completion_id": resp.id, "ranked_response_ids": [a, b], "ranks": [1, -2]},
            400,
        ),
        ("/feedback/comparisons", {**u, "chosen_response_id": a, "rejected_response_id": a}, 400),
        ("/feedback/ratings", {**u, "response_id": a, "scale": "stars", "score": 3}, 400),
        ("/feedback/ratings", {**u, "response_id": a, "scale": "thumb", "score": 5}, 400),
        ("/feedback/ratings", b"{not json", 400),
    ]
    for path, body, status in cases:
        r = await post(api, path, body)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] and err["code"], err
    assert redis_state(serving_redis) == before


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.engine
async def test_bad_keys_get_401(api: Served, serving_redis: redis.Redis) -> None:
    before = redis_state(serving_redis)
    with pytest.raises(openai.AuthenticationError) as e:
        await sdk(api, "wrong-key").chat.completions.create(model="m", messages=CHAT, max_tokens=2)
    assert e.value.status_code == 401
    body = e.value.body
    assert isinstance(body, dict) and body["code"] == "unauthenticated"
    assert "Authorization: Bearer" in body["message"]
    r = await post(api, "/chat/completions", {"messages": CHAT}, key=None)  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    with pytest.raises(openai.AuthenticationError):
        await sdk(api, "wrong-key").models.list()
    rating = {"response_id": "r", "scale": "thumb", "score": 1}
    r = await post(api, "/feedback/ratings", rating, key=None)
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    assert redis_state(serving_redis) == before
    # An admin key may call what a user key may.
    resp = await sdk(api, ADMIN_KEY).completions.create(model="m", prompt="Hi", max_tokens=1)
    assert resp.choices[0].model_extra["response_id"]  # type: ignore[index]


@pytest.mark.engine
async def test_keys_and_quotas_are_the_grpc_sides(served: Served, swap_db: str) -> None:
    """The key rules and the per-principal quotas of the gRPC guard apply over HTTP: a
    labeller key calls only the labelling queue (403 here), and a principal over its
    completion quota gets 429 with Retry-After (the SDK's RateLimitError)."""
    async with running_server(
        None,
        swap_db,
        engine=served.engine,
        http_port=0,
        follow_live=False,
        labeller_keys=("lab-key",),
        quota_completions_per_minute=2,
        replica_id="openai-quota",
    ) as s:
        with pytest.raises(openai.PermissionDeniedError) as e:
            await sdk(s, "lab-key").chat.completions.create(model="m", messages=CHAT, max_tokens=1)
        assert e.value.body["code"] == "permission_denied"  # type: ignore[index]
        r = await post(s, "/feedback/rankings", {"completion_id": "c"}, key="lab-key")
        assert r.status_code == 403
        client = sdk(s)
        for _ in range(2):
            await client.completions.create(model="m", prompt="Hi", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as e2:
            await client.completions.create(model="m", prompt="Hi", max_tokens=1)
        assert e2.value.body["code"] == "resource_exhausted"  # type: ignore[index]
        assert int(e2.value.response.headers["retry-after"]) >= 1
        assert requests_total(s, "/v1/completions", "RESOURCE_EXHAUSTED") == 1


BAD_CHAT: list[tuple[str, dict[str, Any], str]] = [
    ("n 0", {"n": 0}, "n must be at least 1"),
    ("n too big", {"n": 17}, "n must be 1 to 16"),
    ("temperature -1", {"temperature": -1}, "temperature must be 0 to 2"),
    ("max_tokens > ctx", {"max_tokens": 100_000}, "exceeds the model's context"),
    ("max_completion_tokens 0", {"max_completion_tokens": 0}, "max_tokens must be at least 1"),
    ("top_p 0", {"top_p": 0}, "top_p must be in (0, 1]"),
    ("greedy n 2", {"n": 2, "temperature": 0}, "n > 1 needs temperature > 0"),
    ("logprobs", {"logprobs": True}, "logprobs is not supported"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("no messages", {"messages": []}, "the prompt is empty"),
    ("tool role", {"messages": [{"role": "tool", "content": "x"}]}, "role 'tool' is unknown"),
    (
        "image part",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "only text content parts",
    ),
    ("wrong type", {"n": "many"}, "n:"),
]


@pytest.mark.engine
@pytest.mark.parametrize("stream", [False, True])
async def test_bad_parameters_get_400_and_store_nothing(
    api: Served, serving_redis: redis.Redis, stream: bool
) -> None:
    client = sdk(api)
    before = redis_state(serving_redis)
    for name, change, needle in BAD_CHAT:
        body: dict[str, Any] = {"model": "m", "messages": CHAT, "max_tokens": 4, **change}
        with pytest.raises(openai.BadRequestError) as e:
            await client.chat.completions.create(**body, stream=stream)
        assert e.value.status_code == 400, name
        err = e.value.body
        assert isinstance(err, dict) and needle in err["message"], (name, err)
        assert err["type"] == "BadRequestError", (name, err)
    with pytest.raises(openai.BadRequestError) as e:
        await client.completions.create(model="m", prompt=["a", "b"], max_tokens=2, stream=stream)
    assert e.value.body["param"] == "prompt"  # type: ignore[index]
    assert redis_state(serving_redis) == before
    assert api.engine.num_unfinished_requests() == 0


@pytest.mark.engine
async def test_unknown_fields_are_ignored_and_unknown_routes_404(api: Served) -> None:
    resp = await sdk(api).chat.completions.create(
        model="m",
        messages=CHAT,
        max_tokens=2,
        extra_body={"some_future_field": {"x": 1}, "presence_penalty": 0, "logprobs": False},
    )
    assert len(resp.choices) == 1
    r = await post(api, "/nowhere", {})
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"


# --- hot swap ----------------------------------------------------------------------------------


@pytest.fixture
def swap_db(redis_url: str) -> Iterator[str]:
    """The test Redis (its own database), flushed around the test."""
    with flushed_client(redis_url):
        yield redis_url


def _linked_copy(src: Path, dst: Path) -> Path:
    """The same checkpoint at another path (a new registry version with the same weights):
    hard links where the filesystem allows, else a copy."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)
    return dst


@pytest.mark.slow
@pytest.mark.engine
async def test_a_stream_restarted_by_a_hot_swap_says_so(
    served: Served, swap_db: str, tmp_path: Path
) -> None:
    """A server that follows the live version (its own registry, the session's engine): a
    promotion mid-stream, with no drain time, restarts the stream on the new version, which
    the stream says with a `restarted` chunk; a unary request in flight at the same time is
    answered by the version that produced it. The engine goes back to its version after."""
    engine = served.engine
    orig_version, orig_path = engine.model_version, engine.model
    registry = ModelRegistry(swap_db)
    try:
        async with running_server(
            None,
            swap_db,
            engine=engine,
            http_port=0,
            follow_live=True,
            swap_poll_s=0.5,
            swap_drain_timeout_s=0.0,
            swap_verify_fingerprint=False,
            replica_id="openai-swap",
        ) as s:
            store = redis.Redis.from_url(swap_db, decode_responses=True)
            v_from = registry.live().version  # type: ignore[union-attr]
            deadline = time.monotonic() + 60
            while engine.model_version != v_from:  # a fresh registry may name it anew
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            copy = _linked_copy(Path(orig_path), tmp_path / "copy")
            v_to = registry.register(copy, source="test").version
            client = sdk(s)
            raw = await client.completions.with_raw_response.create(
                model="m", prompt=COUNTING, max_tokens=400, temperature=0, stream=True
            )
            assert raw.headers[VERSION_HEADER] == v_from
            chunks: list[Any] = []
            unary: asyncio.Task[Any] | None = None
            async for ch in raw.parse():
                chunks.append(ch)
                if unary is None and ch.choices and ch.choices[0].text:
                    # Mid-stream: promote, and send a unary request into the swap.
                    registry.promote(v_to)
                    unary = asyncio.create_task(
                        client.chat.completions.create(model="m", messages=CHAT, max_tokens=8)
                    )
            assert unary is not None
            restarts = [i for i, ch in enumerate(chunks) if (ch.model_extra or {}).get("restarted")]
            assert len(restarts) == 1, [c.model for c in chunks]
            k = restarts[0]
            assert chunks[k].model == v_to and chunks[k].choices == []
            assert {c.model for c in chunks[:k]} == {v_from}
            assert {c.model for c in chunks[k:]} == {v_to}
            rec = stored_completion(store, chunks[0].id)
            assert rec is not None and rec["model_version"] == v_to
            # What follows the restart is the whole answer, from scratch, on the new weights.
            assert _collect(chunks[k + 1 :]) == {0: rec["responses"][0]["text"]}
            done = await unary
            urec = stored_completion(store, done.id)
            assert urec is not None and urec["model_version"] == done.model
            assert done.model in (v_from, v_to)
            store.close()
            registry.promote(v_from)  # back, before the server (and its swapper) stops
            deadline = time.monotonic() + 120
            while engine.model_version != v_from:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
    finally:
        registry.close()
        if engine.model_version != orig_version:  # the session's version, whatever happened
            await engine.swap(orig_path, orig_version)


# --- command line and shapes (no engine) ------------------------------------------------------


def test_serve_and_up_open_the_http_port() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--http-port", "0", "--http-host", "0.0.0.0"])
    cfg = config_from_args(args)
    assert cfg.http_port == 0 and cfg.http_host == "0.0.0.0" and not cfg.http_access_log
    assert config_from_args(parser.parse_args(["serve"])).http_port is None
    assert up_http_port(parser.parse_args(["up"])) == UP_HTTP_PORT
    assert up_http_port(parser.parse_args(["up", "--http-port", "9001"])) == 9001
    assert up_http_port(parser.parse_args(["up", "--no-http"])) is None


def test_openai_shapes_become_the_grpc_request() -> None:
    chat = ChatCompletionRequest.model_validate(
        {
            "model": "x",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": "Hi"},
            ],
            "n": 3,
            "max_tokens": 9,
            "max_completion_tokens": 7,
            "stop": "\n",
            "seed": 5,
            "user": "u1",
            "metadata": {"app": "t"},
            "unknown": True,
        }
    ).to_proto()
    assert [(m.role, m.content) for m in chat.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert (chat.n, chat.max_tokens, list(chat.stop), chat.seed) == (3, 7, ["\n"], 5)
    assert chat.user_id == "u1" and dict(chat.metadata) == {"app": "t"}
    assert not chat.HasField("temperature") and not chat.HasField("top_p")
    text = CompletionRequest.model_validate({"prompt": ["Once"], "temperature": 0.5}).to_proto()
    assert text.prompt == "Once" and abs(text.temperature - 0.5) < 1e-6


def test_errors_map_to_http_as_grpc_statuses_do() -> None:
    S = grpc.StatusCode
    expected = {
        S.INVALID_ARGUMENT: 400, S.UNAUTHENTICATED: 401, S.PERMISSION_DENIED: 403,
        S.NOT_FOUND: 404, S.ALREADY_EXISTS: 409, S.RESOURCE_EXHAUSTED: 429, S.UNAVAILABLE: 503,
        S.INTERNAL: 500, S.DATA_LOSS: 500,
    }  # fmt: skip
    for code, status in expected.items():
        assert failure_status(RpcFailure(code, "m")) == status, code
    body = failure_body(HttpFailure(S.INVALID_ARGUMENT, "bad n", param="n"))
    assert body == {
        "error": {"message": "bad n", "type": "BadRequestError", "param": "n",
                  "code": "invalid_argument"}
    }  # fmt: skip
    assert failure_body(RpcFailure(S.UNAVAILABLE, "x"))["error"]["type"] == (
        "ServiceUnavailableError"
    )
