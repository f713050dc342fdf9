"""The labelling page in a real browser (Debian's chromium driven by Playwright), and its queue's
HTTP and gRPC faces, against a real server on the session's engine and Redis.

Each test gets a server of its own on the shared engine, with its own key prefix, so that its
queue holds only the completions it makes. The browser tests fail where chromium is not
installed (scripts/install.sh installs it). Screenshots go to the directory the module prints;
with INSTRUCTLOOP_UPDATE_DOCS_IMAGES=1 the labelling page's also goes to docs/images/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instructloop.feedback.keys import LabelKeys, LoopKeys
from instructloop.v1 import completion_pb2, labeling_pb2, labeling_pb2_grpc
from tests.support.redis_state import redis_state
from tests.support.rpc import chat, rpc_error, stubs
from tests.support.server import ADMIN_KEY, USER_KEY, Served, running_server

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ALICE_KEY, BOB_KEY = "alice-labeller-key", "bob-labeller-key"
LABELLER_KEYS = (f"alice:{ALICE_KEY}", f"bob:{BOB_KEY}")
PROMPT = [("system", "Answer in a few words."), ("user", "Name a fruit that is red.")]


# -- the server, its completions, and what Redis holds ------------------------------------------


@dataclass
class Lab:
    served: Served
    prefix: str
    channel: grpc.aio.Channel
    http: httpx.AsyncClient

    @property
    def url(self) -> str:
        url = self.served.server.http_url
        assert url is not None
        return url

    async def complete(self, n: int = 4) -> completion_pb2.CompletionResponse:
        """A logged completion with n candidates: one labelling task."""
        return await stubs(self.channel).completion.Complete(
            chat(*PROMPT, n=n, max_tokens=6, temperature=1.0, user_id="app-user"),
            metadata=self.served.user_md,
        )

    def labelling(self, key: str) -> Any:
        return labeling_pb2_grpc.LabelingServiceStub(self.channel), (
            ("authorization", f"Bearer {key}"),
        )

    async def post(self, path: str, body: Any, key: str | None = ALICE_KEY) -> httpx.Response:
        headers = {} if key is None else {"authorization": f"Bearer {key}"}
        return await self.http.post(self.url + path, json=body, headers=headers)


def records(client: redis.Redis, prefix: str, kind: str = "ranking") -> list[dict[str, Any]]:
    """The stored feedback records of one kind under `prefix`, data merged in."""
    out = []
    for key in client.scan_iter(f"{prefix}fb:*"):
        h = client.hgetall(key)
        if h["kind"] == kind:
            out.append({**h, **json.loads(h["data"])})
    return out


def lab_state(client: redis.Redis, prefix: str) -> dict[str, Any]:
    """The server's keys (its prefix), for "nothing was written" checks."""
    return {k: v for k, v in redis_state(client).items() if k.startswith(prefix)}


@contextlib.asynccontextmanager
async def lab_server(
    served: Served, url: str, client: redis.Redis, **overrides: Any
) -> AsyncIterator[Lab]:
    prefix = f"lab{uuid.uuid4().hex[:8]}:"
    async with running_server(
        None,
        url,
        engine=served.engine,
        http_port=0,
        follow_live=False,
        replica_id="labeling",
        key_prefix=prefix,
        labeller_keys=LABELLER_KEYS,
        **overrides,
    ) as s:
        channel = grpc.aio.insecure_channel(s.address)
        try:
            async with httpx.AsyncClient(timeout=30) as http:
                yield Lab(s, prefix, channel, http)
        finally:
            await channel.close()
            keys = list(client.scan_iter(f"{prefix}*"))
            if keys:
                client.delete(*keys)


@pytest_asyncio.fixture
async def lab(
    served: Served, serving_redis_url: str, serving_redis: redis.Redis
) -> AsyncIterator[Lab]:
    async with lab_server(served, serving_redis_url, serving_redis) as lab:
        yield lab


# -- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("labelling-page")
    print(f"\nlabelling page screenshots: {d}")
    return d


@pytest_asyncio.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    if not Path(CHROMIUM).exists():  # a failure, not a skip: CI must run the browser tests
        pytest.fail(f"{CHROMIUM} is not installed (scripts/install.sh installs Debian's chromium)")
    import playwright.async_api as playwright

    async with playwright.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@contextlib.asynccontextmanager
async def page_of(browser: Any) -> AsyncIterator[Any]:
    """A page in a browser context of its own (its own sessionStorage: another person)."""
    context = await browser.new_context(viewport={"width": 1100, "height": 900})
    try:
        yield await context.new_page()
    finally:
        await context.close()


async def sign_in(page: Any, lab: Lab, key: str) -> None:
    """Open /label and sign in with the keyboard alone: the key field has the focus."""
    await page.goto(lab.url + "/label")
    await page.wait_for_selector("#key:focus")
    await page.keyboard.type(key)
    await page.keyboard.press("Enter")


async def shown_task(page: Any) -> str | None:
    """The task the page shows once it has loaded one (None: the queue is empty for them)."""
    await page.wait_for_selector("#task:not([hidden]), #empty:not([hidden])")
    if await page.is_visible("#empty"):
        return None
    return await page.get_attribute("#task", "data-task-id")


async def shown_order(page: Any) -> list[str]:
    return await page.eval_on_selector_all(
        "#candidates li", "els => els.map(e => e.dataset.responseId)"
    )


async def rank_with_keys(page: Any, keys: list[str]) -> list[str]:
    """From the task's heading (where the focus lands), Tab to the first answer, then press a
    rank key on each answer, moving down with the arrow key. Returns the answers' order."""
    await page.wait_for_selector("#task-h:focus")
    await page.keyboard.press("Tab")
    order = await shown_order(page)
    focused = await page.evaluate("document.activeElement.dataset.responseId")
    assert focused == order[0]
    for i, k in enumerate(keys):
        if i:
            await page.keyboard.press("ArrowDown")
        await page.keyboard.press(k)
    return order


async def saved(page: Any) -> None:
    # Locators, not wait_for_function: the page's CSP forbids the eval the latter needs.
    await page.locator("#message", has_text="Saved").wait_for()


def export_rankings(redis_url: str, prefix: str, out: Path) -> list[dict[str, Any]]:
    """`instructloop feedback export` as an operator runs it; its rankings.jsonl."""
    subprocess.run(
        [
            sys.executable, "-m", "instructloop", "feedback", "export", "--redis-url", redis_url,
            "--prefix", prefix, "--out", str(out),
        ],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]


# -- the page -----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_keyboard_ranking_with_a_tie_lands_in_redis_and_the_export(
    lab: Lab,
    browser: Any,
    serving_redis: redis.Redis,
    serving_redis_url: str,
    artifacts: Path,
    tmp_path: Path,
) -> None:
    c = await lab.complete(4)
    async with page_of(browser) as page:
        await sign_in(page, lab, ALICE_KEY)
        assert await shown_task(page) == c.completion_id
        # the prompt's chat turns and the four candidates are on the page
        turns = await page.eval_on_selector_all("#prompt .turn", "els => els.map(e => e.innerText)")
        assert [t.split("\n")[0].lower() for t in turns] == ["system", "user"]
        assert "Name a fruit that is red." in turns[1]
        order = await rank_with_keys(page, ["1", "3", "1", "2"])
        assert sorted(order) == sorted(ch.response_id for ch in c.choices)
        summary = await page.inner_text("#summary")
        assert summary == "Your ranking: A = C > D > B"
        await page.check("#rating-6")
        await page.fill("#comment", "A and C are equally good.")
        shot = artifacts / "labelling-page.png"
        await page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("INSTRUCTLOOP_UPDATE_DOCS_IMAGES"):
            (REPO / "docs" / "images").mkdir(exist_ok=True)
            shutil.copy(shot, REPO / "docs" / "images" / "labelling-page.png")
        await page.focus("#comment")
        await page.keyboard.press("Control+Enter")
        await saved(page)
        assert await shown_task(page) is None  # R = 1: the only task is done

    expected_ids = [order[0], order[2], order[3], order[1]]
    (ranking,) = records(serving_redis, lab.prefix)
    assert ranking["completion_id"] == c.completion_id
    assert (ranking["response_ids"], ranking["ranks"]) == (expected_ids, [1, 1, 2, 3])
    assert (ranking["user_id"], ranking["principal"]) == ("alice", "alice")
    (rating,) = records(serving_redis, lab.prefix, "rating")
    assert (rating["response_id"], rating["scale"], rating["score"]) == (order[0], "likert7", 6)
    task = serving_redis.hgetall(LabelKeys(lab.prefix).task(c.completion_id))
    assert task["state"] == "done"
    (label,) = [json.loads(v) for k, v in task.items() if k.startswith("end:")]
    assert label["comment"] == "A and C are equally good."

    rows = await asyncio.to_thread(
        export_rankings, serving_redis_url, lab.prefix, tmp_path / "snapshot"
    )
    assert [(r["feedback_id"], r["response_ids"], r["ranks"]) for r in rows] == [
        (ranking["feedback_id"], expected_ids, [1, 1, 2, 3])
    ]


@pytest.mark.slow
async def test_two_labellers_never_get_the_same_task(lab: Lab, browser: Any) -> None:
    made = {(await lab.complete(2)).completion_id for _ in range(3)}
    async with page_of(browser) as alice, page_of(browser) as bob:
        await asyncio.gather(sign_in(alice, lab, ALICE_KEY), sign_in(bob, lab, BOB_KEY))
        a, b = await shown_task(alice), await shown_task(bob)
        assert a in made and b in made and a != b
        # a reloaded page shows the task it holds, not a new one
        await alice.reload()
        assert await shown_task(alice) == a
        # a skip gives Alice the third task; hers goes back to the queue, not to her
        await alice.focus("#skip")
        await alice.keyboard.press("Enter")
        await alice.locator(f"#task:not([data-task-id={json.dumps(a)}])").wait_for()
        c = await shown_task(alice)
        assert c in made and c not in (a, b)


@pytest.mark.slow
async def test_a_lapsed_lease_comes_back(
    served: Served,
    serving_redis_url: str,
    serving_redis: redis.Redis,
    browser: Any,
) -> None:
    lease_s = 4.0  # long enough for Bob to sign in on a busy machine while Alice holds it
    async with lab_server(served, serving_redis_url, serving_redis, label_lease_s=lease_s) as lab:
        made = await lab.complete(3)
        async with page_of(browser) as alice, page_of(browser) as bob:
            await sign_in(alice, lab, ALICE_KEY)
            assert await shown_task(alice) == made.completion_id
            t0 = time.monotonic()  # her lease began before this
            await sign_in(bob, lab, BOB_KEY)
            assert await shown_task(bob) is None  # leased to Alice
            await asyncio.sleep(max(0.0, t0 + lease_s + 0.3 - time.monotonic()))
            await bob.keyboard.press("Enter")  # "Check again" has the focus
            await bob.wait_for_selector("#task:not([hidden])")
            assert await shown_task(bob) == made.completion_id
            # Alice's submit after her lease lapsed is refused, and stores nothing
            before = lab_state(serving_redis, lab.prefix)
            await rank_with_keys(alice, ["1", "2", "3"])
            await alice.keyboard.press("Control+Enter")
            await alice.wait_for_selector("#empty:not([hidden])")
            assert "not leased to you" in await alice.inner_text("#error")
            assert records(serving_redis, lab.prefix) == []
            assert lab_state(serving_redis, lab.prefix) == before
            # Bob's lease holds
            await rank_with_keys(bob, ["2", "1", "3"])
            await bob.keyboard.press("Control+Enter")
            await saved(bob)
        (ranking,) = records(serving_redis, lab.prefix)
        assert ranking["user_id"] == "bob"


@pytest.mark.slow
async def test_a_double_submit_stores_one_ranking(
    lab: Lab, browser: Any, serving_redis: redis.Redis
) -> None:
    first, second = await lab.complete(2), await lab.complete(2)
    async with page_of(browser) as page:
        await sign_in(page, lab, ALICE_KEY)
        assert await shown_task(page) == first.completion_id
        await rank_with_keys(page, ["2", "1"])
        await page.dblclick("#submit")
        await saved(page)
        assert await shown_task(page) == second.completion_id
        # two requests really sent at once, from the page, for the same lease
        acks = await page.evaluate(
            """async () => {
                const t = document.getElementById('task').dataset.taskId;
                const r = await (await fetch('/label/api/next', {method: 'POST',
                    headers: {'Authorization': 'Bearer ' + sessionStorage.getItem(
                        'instructloop-labeller-key'), 'Content-Type': 'application/json'},
                    body: '{}'})).json();
                const ids = r.task.candidates.map(c => c.response_id);
                const body = JSON.stringify({task_id: t, lease_id: r.task.lease_id,
                    ranked_response_ids: ids});
                const post = () => fetch('/label/api/submit', {method: 'POST', body,
                    headers: {'Authorization': 'Bearer ' + sessionStorage.getItem(
                        'instructloop-labeller-key'), 'Content-Type': 'application/json'}})
                    .then(x => x.json());
                return await Promise.all([post(), post()]);
            }"""
        )
    assert sorted(a["duplicate"] for a in acks) == [False, True]
    assert acks[0]["feedback_id"] == acks[1]["feedback_id"]
    rankings = records(serving_redis, lab.prefix)
    assert sorted(r["completion_id"] for r in rankings) == sorted(
        [first.completion_id, second.completion_id]
    )


@pytest.mark.slow
async def test_a_user_key_cannot_sign_in(lab: Lab, browser: Any) -> None:
    await lab.complete(2)
    async with page_of(browser) as page:
        await sign_in(page, lab, USER_KEY)
        await page.wait_for_selector("#sign-in:not([hidden])")
        await page.locator("#error:not(:empty)").wait_for()
        assert "this is a user key" in await page.inner_text("#error")
        assert await page.evaluate("sessionStorage.length") == 0


@pytest.mark.slow
async def test_the_status_page(
    served: Served,
    serving_redis_url: str,
    serving_redis: redis.Redis,
    browser: Any,
    artifacts: Path,
) -> None:
    async with lab_server(served, serving_redis_url, serving_redis, labels_per_task=2) as lab:
        c = await lab.complete(3)
        ids = [ch.response_id for ch in c.choices]
        for key, order in ((ALICE_KEY, ids), (BOB_KEY, [ids[1], ids[0], ids[2]])):
            stub, md = lab.labelling(key)
            t = (await stub.NextTask(labeling_pb2.NextTaskRequest(), metadata=md)).task
            await stub.SubmitLabel(
                labeling_pb2.SubmitLabelRequest(
                    task_id=t.task_id, lease_id=t.lease_id, ranked_response_ids=order
                ),
                metadata=md,
            )
        # a finished cycle, as the training loop records it (training/loop/store.py)
        loop = LoopKeys(lab.prefix)
        serving_redis.hset(
            loop.cycle("cyc-test-1"),
            mapping={
                "id": "cyc-test-1", "state": "promoted", "trigger": "manual",
                "created_at": time.time() - 600, "finished_at": time.time() - 60,
                "parent_version": "v1", "candidate_version": "v2",
                "out:gate": json.dumps({"passed": True, "checks": {"win_rate_rm": True}}),
                "out:evaluate": json.dumps({"metrics": {"win_rate_rm": 0.61, "other": 1}}),
            },
        )  # fmt: skip
        serving_redis.zadd(loop.cycles, {"cyc-test-1": time.time() - 600})

        r = await lab.http.get(lab.url + "/status/api", headers={"authorization": "Bearer x"})
        assert r.status_code == 401
        for key in (ALICE_KEY, USER_KEY):
            r = await lab.http.get(
                lab.url + "/status/api", headers={"authorization": f"Bearer {key}"}
            )
            assert r.status_code == 403, r.text
        r = await lab.http.get(
            lab.url + "/status/api", headers={"authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["serving"]["version"] == served.engine.model_version
        q = d["queue"]
        assert (q["done"], q["labels"], q["labels_last_hour"], q["pairs_judged"]) == (1, 2, 2, 3)
        assert q["agreement"] == pytest.approx(2 / 3)
        assert {lb["labeller"] for lb in q["labellers"]} == {"alice", "bob"}
        (cycle,) = d["cycles"]
        assert cycle["state"] == "promoted" and cycle["gate"]["passed"] is True
        assert cycle["figures"] == {"win_rate_rm": 0.61}

        async with page_of(browser) as page:
            await page.goto(lab.url + "/status")
            await page.wait_for_selector("#key:focus")
            await page.keyboard.type(ADMIN_KEY)
            await page.keyboard.press("Enter")
            await page.wait_for_selector("#figures:not([hidden])")
            text = await page.inner_text("#figures")
            assert served.engine.model_version in text
            assert "66.7% of 3 pairs" in text
            assert "cyc-test-1" in text and "passed" in text and "win_rate_rm 0.610" in text
            await page.screenshot(path=str(artifacts / "status-page.png"), full_page=True)


# -- the API without a browser ------------------------------------------------------------------


async def test_keys_and_roles(lab: Lab) -> None:
    """Labeller keys label and nothing else; user keys cannot label."""
    c = await lab.complete(2)
    for key, status in ((None, 401), ("wrong", 401), (USER_KEY, 403)):
        r = await lab.post("/label/api/next", {}, key)
        assert r.status_code == status, r.text
        assert r.json()["error"]["message"]
    r = await lab.post("/label/api/next", {}, USER_KEY)
    assert "needs a labeller or admin key; this is a user key" in r.json()["error"]["message"]
    r = await lab.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 403 and "labeller key" in r.json()["error"]["message"]
    # gRPC: the same rules
    stub, md = lab.labelling(ALICE_KEY)
    got = await stub.NextTask(labeling_pb2.NextTaskRequest(), metadata=md)
    assert got.has_task and got.task.task_id == c.completion_id
    err = await rpc_error(
        stubs(lab.channel).completion.Complete(chat(("user", "hi"), max_tokens=2), metadata=md)
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await rpc_error(
        stub.NextTask(labeling_pb2.NextTaskRequest(), metadata=lab.served.user_md)
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "labeller" in (err.details() or "")
    # an admin key may label too
    got = await stub.NextTask(labeling_pb2.NextTaskRequest(), metadata=lab.served.admin_md)
    assert not got.has_task  # the only task is Alice's


async def test_bad_input_is_refused_and_stores_nothing(
    lab: Lab, serving_redis: redis.Redis
) -> None:
    mine, other = await lab.complete(3), await lab.complete(3)
    t = (await lab.post("/label/api/next", {})).json()["task"]
    b = (await lab.post("/label/api/next", {}, BOB_KEY)).json()["task"]
    assert (t["task_id"], b["task_id"]) == (mine.completion_id, other.completion_id)
    ids = [ch["response_id"] for ch in t["candidates"]]
    ok = {"task_id": t["task_id"], "lease_id": t["lease_id"], "ranked_response_ids": ids}
    before = lab_state(serving_redis, lab.prefix)
    cases: list[tuple[dict[str, Any], str | None, int, str]] = [
        ({**ok, "ranked_response_ids": [*ids[:2], "resp-forged"]}, ALICE_KEY, 400,
         "not a candidate"),
        ({**ok, "ranked_response_ids": [*ids[:2], other.choices[0].response_id]}, ALICE_KEY, 400,
         "not a candidate"),
        ({**ok, "task_id": b["task_id"], "lease_id": b["lease_id"],
          "ranked_response_ids": [ch["response_id"] for ch in b["candidates"]]}, ALICE_KEY, 400,
         "not leased to you"),
        ({**ok, "lease_id": "lease-forged"}, ALICE_KEY, 400, "not leased to you"),
        (ok, BOB_KEY, 400, "not leased to you"),
        ({**ok, "comment": "x" * 2001}, ALICE_KEY, 400, "at most 2000"),
        ({**ok, "rating": 9}, ALICE_KEY, 400, "1 (worst) to 7"),
        ({**ok, "ranks": [1, 3, 4]}, ALICE_KEY, 400, "dense"),
        ({**ok, "surprise": 1}, ALICE_KEY, 400, "invalid request body"),
        (ok, None, 401, "missing or invalid key"),
        ({**ok, "comment": "x" * 70_000}, ALICE_KEY, 413, "larger than"),
    ]  # fmt: skip
    for body, key, status, message in cases:
        r = await lab.post("/label/api/submit", body, key)
        assert r.status_code == status, (body.keys(), r.text)
        assert message in r.json()["error"]["message"], r.text
    # the same over gRPC
    stub, md = lab.labelling(ALICE_KEY)
    err = await rpc_error(
        stub.SubmitLabel(
            labeling_pb2.SubmitLabelRequest(
                task_id=t["task_id"], lease_id=t["lease_id"],
                ranked_response_ids=[*ids[:2], "resp-forged"],
            ),
            metadata=md,
        )
    )  # fmt: skip
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = await rpc_error(
        stub.FlagTask(
            labeling_pb2.FlagTaskRequest(task_id=t["task_id"], lease_id=t["lease_id"]),
            metadata=md,
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "reason" in (err.details() or "")
    assert lab_state(serving_redis, lab.prefix) == before
    # and the good one still goes through
    r = await lab.post("/label/api/submit", ok)
    assert r.status_code == 200 and not r.json()["duplicate"], r.text


async def test_grpc_skip_flag_and_stats(lab: Lab, serving_redis: redis.Redis) -> None:
    first, second = await lab.complete(2), await lab.complete(2)
    alice, md = lab.labelling(ALICE_KEY)
    bob_md = (("authorization", f"Bearer {BOB_KEY}"),)
    t = (await alice.NextTask(labeling_pb2.NextTaskRequest(), metadata=md)).task
    assert t.task_id == first.completion_id and len(t.candidates) == 2
    assert [m.role for m in t.messages] == ["system", "user"] and not t.prompt
    skip = labeling_pb2.SkipTaskRequest(task_id=t.task_id, lease_id=t.lease_id)
    assert not (await alice.SkipTask(skip, metadata=md)).duplicate
    assert (await alice.SkipTask(skip, metadata=md)).duplicate
    t2 = (await alice.NextTask(labeling_pb2.NextTaskRequest(), metadata=md)).task
    assert t2.task_id == second.completion_id
    flagged = await alice.FlagTask(
        labeling_pb2.FlagTaskRequest(
            task_id=t2.task_id, lease_id=t2.lease_id, reason=labeling_pb2.FLAG_REASON_BROKEN,
            comment="empty answers",
        ),
        metadata=md,
    )  # fmt: skip
    assert not flagged.duplicate
    assert not (await alice.NextTask(labeling_pb2.NextTaskRequest(), metadata=md)).has_task
    back = (await alice.NextTask(labeling_pb2.NextTaskRequest(), metadata=bob_md)).task
    assert back.task_id == first.completion_id  # skipped by Alice, Bob's now
    stats = await alice.GetQueueStats(labeling_pb2.GetQueueStatsRequest(), metadata=md)
    assert (stats.available, stats.leased, stats.flagged, stats.skips) == (0, 1, 1, 1)
    assert dict(stats.flags_by_reason) == {"broken": 1}
    assert not stats.HasField("agreement")
    assert records(serving_redis, lab.prefix) == []
    health = health_pb2_grpc.HealthStub(lab.channel)
    r = await health.Check(health_pb2.HealthCheckRequest(service="instructloop.v1.LabelingService"))
    assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_the_page_has_no_inline_script_and_labels_every_control() -> None:
    """The page's HTML: every form control has a label, no inline script (the CSP forbids
    it), every text from the server is set as text (no innerHTML)."""
    page = REPO / "serving" / "label_page"
    html = (page / "label.html").read_text()
    assert "<script>" not in html and "onclick" not in html
    for control in re.findall(r"<(?:input|textarea|select)[^>]*\bid=\"([^\"]+)\"", html):
        assert f'for="{control}"' in html, f"#{control} has no <label for>"
    for js in ("label.js", "status.js"):
        assert "innerHTML" not in (page / js).read_text()
