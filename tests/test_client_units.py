"""The light client's parts that need no server: the retry policy, the requests it builds from
what the caller passes, acknowledgements, and a stream put back together (restarts included).
Against the real server: tests/serving/test_client_library.py."""

from __future__ import annotations

import grpc
import pytest
from instructloop_client import RetryPolicy
from instructloop_client._calls import (
    ack,
    completion_request,
    credentials,
    ranking_request,
    rating_request,
)
from instructloop_client.types import (
    Choice,
    ChoiceDelta,
    Completion,
    CompletionChunk,
    StreamAssembler,
    Usage,
)
from instructloop_client.v1 import feedback_pb2

C = Completion(
    completion_id="cmpl-1",
    model_version="v1",
    choices=tuple(Choice(i, f"resp-{i}", f"t{i}", "stop", 1) for i in range(3)),
    usage=Usage(3, 3),
    created=None,
    logged=True,
)


class _Err(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_retry_policy_retries_what_is_safe_and_stops() -> None:
    p = RetryPolicy(max_attempts=3)
    unavailable, deadline = (
        _Err(grpc.StatusCode.UNAVAILABLE),
        _Err(grpc.StatusCode.DEADLINE_EXCEEDED),
    )
    assert p.should_retry(unavailable, 1, idempotent=False)
    assert p.should_retry(deadline, 1, idempotent=True)
    assert not p.should_retry(deadline, 1, idempotent=False)  # a completion may still run
    assert not p.should_retry(_Err(grpc.StatusCode.INVALID_ARGUMENT), 1, idempotent=True)
    assert not p.should_retry(unavailable, 3, idempotent=True)  # the third try was the last
    waits = [p.backoff_s(k) for k in range(1, 10)]
    assert all(0.1 <= w <= 5.0 for w in waits) and max(waits) >= 2.5
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_requests_from_what_the_caller_passes() -> None:
    chat = completion_request(
        [{"role": "system", "content": "Be brief."}, ("user", "Hi")],
        n=2, max_tokens=None, temperature=0.0, top_p=None, seed=7, stop=["\n"], user_id="u",
        metadata={"app": "x"}, disable_logging=False,
    )  # fmt: skip
    assert [m.role for m in chat.messages] == ["system", "user"] and not chat.prompt
    assert chat.HasField("temperature") and chat.temperature == 0.0  # greedy is not "unset"
    assert not chat.HasField("max_tokens") and chat.seed == 7
    r = ranking_request(C, [2, C.choices[0], "resp-1"], ranks=None, user_id="u", key="k")
    assert list(r.ranked_response_ids) == ["resp-2", "resp-0", "resp-1"]
    assert r.completion_id == "cmpl-1" and r.idempotency_key == "k"
    with pytest.raises(ValueError, match="out of range"):
        ranking_request(C, [0, 3], ranks=None, user_id="u", key="k")
    with pytest.raises(ValueError, match="needs the Completion"):
        ranking_request("cmpl-1", [0, 1], ranks=None, user_id="u", key="k")
    with pytest.raises(ValueError, match="scale"):
        rating_request(C.choices[0], 1, scale="stars", user_id="u", key="k")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        credentials("/nonexistent/ca.crt")


def test_a_duplicate_of_the_clients_own_earlier_try_is_new_to_the_caller() -> None:
    msg = feedback_pb2.FeedbackAck(feedback_id="fb-1", duplicate=True)
    assert not ack(msg, own_key=True, attempts=2).duplicate  # our first try landed
    assert ack(msg, own_key=True, attempts=1).duplicate  # cannot be ours: keep the server's word
    assert ack(msg, own_key=False, attempts=2).duplicate  # the caller's key: maybe reused


def test_a_stream_is_put_back_together_and_a_restart_drops_what_came_before() -> None:
    def chunk(deltas: list[tuple[int, str, str]], **kw: object) -> CompletionChunk:
        base: dict[str, object] = {
            "completion_id": "cmpl-1", "model_version": "v1", "usage": None, "logged": False,
            "restarted": False,
        }  # fmt: skip
        base.update(kw)
        return CompletionChunk(
            choices=tuple(ChoiceDelta(i, f"resp-{i}", t, f, 1 if f else 0) for i, t, f in deltas),
            **base,  # type: ignore[arg-type]
        )

    s = StreamAssembler()
    s.add(chunk([(0, "old ", ""), (1, "gone", "")]))
    with pytest.raises(RuntimeError, match="not finished"):
        s.completion()
    s.add(chunk([(0, "Hel", ""), (1, "Yo", "stop")], model_version="v2", restarted=True))
    s.add(chunk([(0, "lo", "length")], model_version="v2", usage=Usage(2, 3), logged=True))
    c = s.completion()
    assert [(ch.text, ch.finish_reason) for ch in c.choices] == [
        ("Hello", "length"),
        ("Yo", "stop"),
    ]
    assert c.model_version == "v2" and c.logged and c.usage == Usage(2, 3)
