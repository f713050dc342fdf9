"""Hot swap in the running server (serving/hot_swap.py, Engine.swap), end to end.

Real parts only: two replicas (InstructloopServer, each with its own vLLM engine) follow one
registry in a real Redis, clients talk gRPC over sockets, promotions go through ModelService.

The claims:
- a promotion reaches every replica, without a restart; each then generates exactly what
  transformers generates on the new checkpoint, token for token, for a checkpoint in which every
  tensor changed, embeddings included (the case vLLM's plain in-place reload gets wrong on tied
  embeddings, docs/VLLM-CPU.md); a freshly started replica on the live version generates the same;
- under constant concurrent load (unary and streams) no request fails, and every response's
  tokens are exactly what its named version produces greedily: never a mix of two versions,
  whether the request finished on the old weights (long drain) or was restarted on the new
  ones (short drain; a stream is told with `restarted`);
- a checkpoint that does not load (wrong shape, forced live past the registry's verification;
  changed on disk since it was registered) leaves the old version serving, and the alert metric
  shows it;
- PromoteModel / RollbackModel need an admin key and a valid version, and change nothing else.

Engines run in float32: there vLLM and transformers agree over many tokens, and the CPU backend
prepacks the tied head through oneDNN on any x86 machine (the trap). At most three engines are
alive at once (the serving session's, replica A, and B or C).
"""

from __future__ import annotations

import asyncio
import shutil
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import redis

from instructloop.registry import ModelRegistry
from instructloop.v1 import completion_pb2, model_pb2
from tests.support.checkpoints import edit_checkpoint, perturb_checkpoint
from tests.support.data import QUESTIONS, chat_prompts
from tests.support.redis_state import redis_state, stored_completion
from tests.support.reference import checkpoint_greedy as hf_greedy
from tests.support.rpc import chat, rpc_error, stubs
from tests.support.server import Served, running_server

pytestmark = [pytest.mark.slow, pytest.mark.engine]

SWAP_DB = 13  # its own database: other packages flush 15, the serving session uses 14
N_REF = 40  # reference tokens per prompt
MAX_TOKENS = 32
REPLICA = {
    "dtype": "float32",
    "max_model_len": 1024,
    "follow_live": True,
    "swap_poll_s": 1.0,
    "swap_retry_s": 3600.0,  # a failed version is not retried inside a test
    "feedback_rate_limit_per_minute": 0,
}


@dataclass
class World:
    url: str
    redis: redis.Redis
    registry: ModelRegistry
    ckpts: dict[str, Path]
    versions: dict[str, str]  # checkpoint name -> registry version
    refs: dict[str, list[list[int]]]  # checkpoint name -> greedy tokens per question
    eos: int
    a: Served
    b: Served | None

    def ref_for(self, version: str) -> list[list[int]]:
        name = next(n for n, v in self.versions.items() if v == version)
        return self.refs[name]


@pytest.fixture(scope="module")
def swap_ckpts(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hot_swap")
    down = "model.layers.20.mlp.down_proj.weight"

    def wrong_shape(state: dict[str, Any]) -> None:
        state[down] = state[down][:, :100].contiguous()

    return {
        "orig": model_dir,
        "pert": perturb_checkpoint(model_dir, root / "pert"),
        "wrong_shape": edit_checkpoint(model_dir, root / "wrong_shape", wrong_shape),
    }


@pytest.fixture(scope="module")
def swap_refs(swap_ckpts: dict[str, Path], model_dir: Path) -> dict[str, list[list[int]]]:
    prompts = chat_prompts(model_dir)
    refs = {n: hf_greedy(swap_ckpts[n], prompts, N_REF, "float32") for n in ("orig", "pert")}
    # Every question's greedy answers part before either ends (EOS or MAX_TOKENS), so each
    # response names its version by its tokens, and a mix of the two matches neither.
    eos = _eos(model_dir)
    for o, p in zip(refs["orig"], refs["pert"], strict=True):
        k = next(i for i, (x, y) in enumerate(zip(o, p, strict=True)) if x != y)
        assert k < MAX_TOKENS and eos not in o[:k] and eos not in p[:k], (k, o, p)
    return refs


def _eos(model_dir: Path) -> int:
    from transformers import AutoTokenizer

    return int(AutoTokenizer.from_pretrained(str(model_dir)).eos_token_id)


@pytest_asyncio.fixture(scope="module")
async def world(
    redis_url: str,
    swap_ckpts: dict[str, Path],
    swap_refs: dict[str, list[list[int]]],
) -> AsyncIterator[World]:
    url = redis_url.rsplit("/", 1)[0] + f"/{SWAP_DB}"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushdb()
    registry = ModelRegistry(url)
    eos = _eos(swap_ckpts["orig"])
    try:
        # A starts on orig (registers it, makes it live); B starts on whatever is live.
        async with (
            running_server(swap_ckpts["orig"], url, replica_id="A", **REPLICA) as a,
            running_server(None, url, replica_id="B", **REPLICA) as b,
        ):
            versions = {"orig": a.engine.model_version}
            assert b.engine.model_version == versions["orig"]
            versions["pert"] = registry.register(swap_ckpts["pert"], source="test").version
            # Registration refuses it (instructloop/registry/verify.py); registered unverified
            # and forced live, it shows that a replica's own validation still holds.
            versions["wrong_shape"] = registry.register(
                swap_ckpts["wrong_shape"], source="test", verify=None
            ).version
            yield World(url, client, registry, swap_ckpts, versions, swap_refs, eos, a, b)
    finally:
        registry.close()
        client.flushdb()
        client.close()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _req(i: int, **kw: Any) -> completion_pb2.CompletionRequest:
    return chat(("user", QUESTIONS[i]), max_tokens=MAX_TOKENS, temperature=0.0, **kw)


def check_tokens(ids: list[int], finish: str, ref: list[int], eos: int) -> None:
    """`ids` are exactly the greedy continuation `ref`: the same tokens up to where they stop,
    and they stop where greedy decoding does (EOS, kept in the ids, or max_tokens)."""
    assert ids == ref[: len(ids)], (ids, ref)
    if finish == "length":
        assert len(ids) == MAX_TOKENS
    else:
        assert finish == "stop" and ids[-1] == eos, (finish, ids)


async def greedy(w: World, s: Served, i: int) -> tuple[str, list[int]]:
    """(model_version, token ids) of a greedy Complete on replica `s`, checked against the
    transformers reference of the version the response names."""
    async with grpc.aio.insecure_channel(s.address) as ch:
        resp = await stubs(ch).completion.Complete(_req(i), metadata=s.user_md)
    rec = stored_completion(w.redis, resp.completion_id)
    assert rec is not None and rec["model_version"] == resp.model_version
    (r,) = rec["responses"]
    check_tokens(r["token_ids"], r["finish_reason"], w.ref_for(resp.model_version)[i], w.eos)
    return resp.model_version, r["token_ids"]


async def serving(s: Served) -> model_pb2.ServingModel:
    async with grpc.aio.insecure_channel(s.address) as ch:
        return await stubs(ch).model.GetServingModel(
            model_pb2.GetServingModelRequest(), metadata=s.admin_md
        )


async def wait_serving(replicas: list[Served], version: str, timeout: float = 120.0) -> float:
    """Seconds until every replica reports `version` (GetServingModel over gRPC)."""
    t0 = time.monotonic()
    while True:
        got = [(await serving(s)).model.version for s in replicas]
        if all(v == version for v in got):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, f"replicas serve {got}, not {version}"
        await asyncio.sleep(0.1)


async def admin(s: Served, method: str, request: Any) -> model_pb2.ServingModel:
    async with grpc.aio.insecure_channel(s.address) as ch:
        return await getattr(stubs(ch).model, method)(request, metadata=s.admin_md)


async def until(cond: Any, timeout: float = 60.0) -> None:
    """Wait for `cond()` to hold (the replica reacts to the registry on its own); fail if not."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        await asyncio.sleep(0.1)


def metric(s: Served, name: str, **labels: str) -> float:
    v = s.server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


async def ensure_live(w: World, name: str) -> None:
    """Make checkpoint `name` live (promoting the live version again is a no-op) and wait
    until replica A serves it."""
    w.registry.promote(w.versions[name], force=True)
    await wait_serving([w.a], w.versions[name])


# ---------------------------------------------------------------------------------------------
# Tests (in order: they share the module's replicas)
# ---------------------------------------------------------------------------------------------


async def test_promote_reaches_every_replica_and_matches_transformers(world: World) -> None:
    w = world
    assert w.b is not None
    v_orig, v_pert = w.versions["orig"], w.versions["pert"]
    for s in (w.a, w.b):
        for i in range(len(QUESTIONS)):
            assert (await greedy(w, s, i))[0] == v_orig

    sm = await admin(w.a, "PromoteModel", model_pb2.PromoteModelRequest(version=v_pert))
    assert sm.live_version == v_pert and w.registry.live().version == v_pert
    took = await wait_serving([w.a, w.b], v_pert)
    assert took < 60, took
    for s in (w.a, w.b):
        for i in range(len(QUESTIONS)):
            assert (await greedy(w, s, i))[0] == v_pert  # tokens checked against transformers
        sm = await serving(s)
        assert sm.model.version == sm.live_version == v_pert
        assert Path(sm.model.path) == w.ckpts["pert"].resolve()
        assert sm.serving_since.ToNanoseconds() / 1e9 > time.time() - 120
        assert metric(s, "instructloop_swaps_total", outcome="ok") == 1
        assert metric(s, "instructloop_swap_failed") == 0
        assert metric(s, "instructloop_swap_duration_seconds_count", phase="load") == 1
    # The served version per replica, as Prometheus scrapes it: one series, the new version.
    with urllib.request.urlopen(w.a.metrics_url, timeout=10) as r:
        text = r.read().decode()
    series = [ln for ln in text.splitlines() if ln.startswith("instructloop_served_model_info{")]
    assert len(series) == 1 and f'version="{v_pert}"' in series[0], series
    assert 'replica="A"' in series[0] and series[0].endswith(" 1.0")

    # Rollback through the API: both replicas go back, and generate the original tokens again.
    sm = await admin(w.a, "RollbackModel", model_pb2.RollbackModelRequest())
    assert sm.live_version == v_orig
    await wait_serving([w.a, w.b], v_orig)
    for s in (w.a, w.b):
        assert (await greedy(w, s, 0))[0] == v_orig


@dataclass
class Outcome:
    kind: str
    i: int
    version: str
    completion_id: str
    text: str
    restarted: bool = False


async def _load(w: World, stop: asyncio.Event, out: list[Outcome], errors: list[Any], k: int):
    """One simulated client: greedy requests back to back, unary and streaming in turn."""
    async with grpc.aio.insecure_channel(w.a.address) as ch:
        s = stubs(ch)
        n = 0
        while not stop.is_set():
            i = (k + n) % len(QUESTIONS)
            try:
                if n % 2 == 0:
                    resp = await s.completion.Complete(_req(i), metadata=w.a.user_md)
                    out.append(
                        Outcome("unary", i, resp.model_version, resp.completion_id,
                                resp.choices[0].text)
                    )  # fmt: skip
                else:
                    text, restarted, last = "", False, None
                    async for chunk in s.completion.StreamComplete(_req(i), metadata=w.a.user_md):
                        if chunk.restarted:
                            text, restarted = "", True
                        text += "".join(c.text for c in chunk.choices)
                        last = chunk
                    assert last is not None and last.choices[0].finish_reason
                    out.append(
                        Outcome("stream", i, last.model_version, last.completion_id, text,
                                restarted)
                    )  # fmt: skip
            except Exception as e:  # every failure is a test failure, reported below
                errors.append(e)
            n += 1


async def test_swaps_under_load_fail_nothing_and_never_mix_versions(world: World) -> None:
    w = world
    await ensure_live(w, "orig")
    server = w.a.server
    base_cfg = server.config
    ok_before = metric(w.a, "instructloop_swaps_total", outcome="ok")
    restarted_before = metric(w.a, "instructloop_swap_restarted_requests_total")
    out: list[Outcome] = []
    errors: list[Any] = []
    stop = asyncio.Event()
    clients = [asyncio.create_task(_load(w, stop, out, errors, k)) for k in range(6)]
    try:
        plan = [
            ("pert", 0.0),  # abort at once: requests in flight restart on the new weights
            ("orig", 60.0),  # wait: requests in flight finish on the old weights
            ("pert", 0.3),
        ]
        for name, drain in plan:
            await asyncio.sleep(3.0)  # let requests get going
            server.config = base_cfg.with_(swap_drain_timeout_s=drain)
            w.registry.promote(w.versions[name])
            await wait_serving([w.a], w.versions[name])
        await asyncio.sleep(3.0)
    finally:
        stop.set()
        await asyncio.gather(*clients)
        server.config = base_cfg
    assert not errors, errors[:3]
    for o in out:
        rec = stored_completion(w.redis, o.completion_id)
        assert rec is not None and rec["model_version"] == o.version
        (r,) = rec["responses"]
        check_tokens(r["token_ids"], r["finish_reason"], w.ref_for(o.version)[o.i], w.eos)
        assert o.text == r["text"], (o, r["text"])  # a restarted stream rebuilt the same text
    versions = {o.version for o in out}
    assert versions == {w.versions["orig"], w.versions["pert"]}, versions
    assert len(out) >= 12
    assert metric(w.a, "instructloop_swaps_total", outcome="ok") == ok_before + len(plan)
    # The short drains restarted requests (a stream among them, told so); the long one did not.
    assert metric(w.a, "instructloop_swap_restarted_requests_total") > restarted_before
    print(f"\n{len(out)} responses, {sum(o.restarted for o in out)} restarted streams")


async def test_bad_checkpoints_leave_the_old_version_serving_with_an_alert(
    world: World, tmp_path: Path
) -> None:
    w = world
    await ensure_live(w, "pert")
    v_pert = w.versions["pert"]
    failed_before = metric(w.a, "instructloop_swaps_total", outcome="failed")

    # 1. Wrong tensor shape (forced past the registry's verification): refused by validation
    # before anything pauses.
    w.registry.promote(w.versions["wrong_shape"], force=True)
    await until(lambda: metric(w.a, "instructloop_swap_failed") == 1)
    assert metric(w.a, "instructloop_replica_behind_live") == 1
    assert metric(w.a, "instructloop_swaps_total", outcome="failed") == failed_before + 1
    assert w.a.server.swapper is not None and "shape" in (w.a.server.swapper.last_error or "")
    sm = await serving(w.a)
    assert sm.model.version == v_pert and sm.live_version == w.versions["wrong_shape"]
    assert (await greedy(w, w.a, 1))[0] == v_pert

    # 2. A checkpoint changed on disk after it was registered: the fingerprint refuses it.
    changed = Path(shutil.copytree(w.ckpts["orig"], tmp_path / "changed"))
    v_changed = w.registry.register(changed, source="test").version
    shutil.copyfile(w.ckpts["pert"] / "model.safetensors", changed / "model.safetensors")
    w.registry.promote(v_changed)
    await until(lambda: "changed since" in (w.a.server.swapper.last_error or ""))
    assert metric(w.a, "instructloop_swaps_total", outcome="failed") == failed_before + 2
    assert (await greedy(w, w.a, 2))[0] == v_pert

    # Back to a good version: the alert clears.
    w.registry.promote(v_pert)
    await until(lambda: metric(w.a, "instructloop_swap_failed") == 0)
    assert metric(w.a, "instructloop_replica_behind_live") == 0


async def test_promote_and_rollback_rpcs_check_key_and_version(world: World) -> None:
    w = world
    await ensure_live(w, "pert")
    before = redis_state(w.redis)
    async with grpc.aio.insecure_channel(w.a.address) as ch:
        m = stubs(ch).model
        for call in (
            m.PromoteModel(model_pb2.PromoteModelRequest(version="v1"), metadata=w.a.user_md),
            m.RollbackModel(model_pb2.RollbackModelRequest(), metadata=w.a.user_md),
        ):
            assert (await rpc_error(call)).code() == grpc.StatusCode.PERMISSION_DENIED
        req = model_pb2.PromoteModelRequest
        err = await rpc_error(m.PromoteModel(req(version="v404"), metadata=w.a.admin_md))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        err = await rpc_error(m.PromoteModel(req(), metadata=w.a.admin_md))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A version whose gate failed never goes live, unless an operator forces it.
        w.registry.set_gate(w.versions["orig"], "failed")
        before = redis_state(w.redis)
        err = await rpc_error(m.PromoteModel(req(version=w.versions["orig"]),
                                             metadata=w.a.admin_md))  # fmt: skip
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "gate" in err.details()
        assert redis_state(w.redis) == before
        sm = await m.PromoteModel(req(version=w.versions["orig"], force=True),
                                  metadata=w.a.admin_md)  # fmt: skip
        assert sm.live_version == w.versions["orig"]
        await wait_serving([w.a], w.versions["orig"])
        w.registry.set_gate(w.versions["orig"], None)


async def test_a_restarted_replica_starts_on_the_live_version(world: World) -> None:
    """Replica B stops; C starts fresh with no --model: it loads the live version, and its
    tokens equal those of A, which got there by swapping (a fresh engine against a swapped
    one, same checkpoint)."""
    w = world
    await ensure_live(w, "pert")
    if w.b is not None:  # at most three engines at once
        await w.b.server.stop(grace=1.0)
        w.b = None
    async with running_server(None, w.url, replica_id="C", **REPLICA) as c:
        assert c.engine.model_version == w.versions["pert"]
        sm = await serving(c)
        assert sm.model.version == sm.live_version == w.versions["pert"]
        for i in range(len(QUESTIONS)):
            va, ta = await greedy(w, w.a, i)
            vc, tc = await greedy(w, c, i)
            assert va == vc == w.versions["pert"] and ta == tc
        assert metric(c, "instructloop_swaps_total", outcome="ok") == 0  # started on it
