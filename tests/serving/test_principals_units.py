"""Units of principals and quotas that need no engine: key entries, the keys' principals, the
authenticator's verdicts, the quota settings, the retry hint and the guard's deserializer."""

from __future__ import annotations

from pathlib import Path

import pytest

from instructloop.serving.auth import Authenticator, derived_principal, parse_key_entry
from instructloop.serving.config import ConfigError, ServerConfig
from instructloop.serving.errors import RpcFailure, _tolerant, _Undecodable
from instructloop.serving.quotas import retry_after
from instructloop.v1 import completion_pb2

MODEL_RPC = "/instructloop.v1.ModelService/ListModels"
FEEDBACK_RPC = "/instructloop.v1.FeedbackService/SubmitRating"


def test_key_entries() -> None:
    assert parse_key_entry("team-a:s3cret") == ("team-a", "s3cret")
    assert parse_key_entry("  s3cret ") == (derived_principal("s3cret"), "s3cret")
    assert parse_key_entry("a:b:c") == ("a", "b:c")  # the name ends at the first ':'
    name = derived_principal("s3cret")
    assert name.startswith("key-") and len(name) == 12 and "s3cret" not in name
    assert derived_principal("s3cret") == name != derived_principal("other")
    for bad in ("", ":key", "bad name:key", "x/y:key", "ok:", "-x:key", "n" * 65 + ":k"):
        with pytest.raises(ValueError):
            parse_key_entry(bad)


def test_key_principals_from_env_and_file(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("bare-key\nuser app:u-key\nadmin ops:a-key  # the ops team\n")
    cfg = ServerConfig(api_keys=("web:w1", "w2"), admin_keys=("root",), api_keys_file=f)
    users, admins = cfg.key_principals()
    assert users == {
        "w1": "web",
        "w2": derived_principal("w2"),
        "bare-key": derived_principal("bare-key"),
        "u-key": "app",
    }
    assert admins == {"root": derived_principal("root"), "a-key": "ops"}
    assert cfg.all_keys() == (frozenset(users), frozenset(admins))  # the keys alone, as before
    with pytest.raises(ConfigError, match="two principals"):
        ServerConfig(api_keys=("a:k", "b:k")).key_principals()
    with pytest.raises(ConfigError, match="INSTRUCTLOOP_API_KEYS: principal name"):
        ServerConfig(api_keys=("bad name:k",)).validate()
    f.write_text("user bad/name:k\n")
    with pytest.raises(ConfigError, match=r"keys:1: principal name"):
        ServerConfig(api_keys_file=f).validate()


def test_authenticator_principals() -> None:
    auth = Authenticator({"k1": "web", "k2": "web", "k3": "app"}, {"adm": "ops"})
    assert auth.principals == {"web", "app", "ops"}
    assert auth.principal("Bearer k2") == "web"  # a rotated key keeps its principal
    assert auth.principal("Bearer nope") is None and auth.principal(None) is None
    assert auth.identify("bearer adm") == ("admin", "ops")
    md = [("authorization", "Bearer k3")]
    assert auth.check(FEEDBACK_RPC, md) == (None, "app")
    assert auth.check(MODEL_RPC, md) == ("admin", "app")
    assert auth.check(MODEL_RPC, [("authorization", "Bearer adm")]) == (None, "ops")
    assert auth.check(FEEDBACK_RPC, [("authorization", "Bearer x")])[0] == "key"
    assert auth.refusal(FEEDBACK_RPC, None) == "key"
    # Plain key sets (the older form) get derived names; no keys: everyone is "".
    plain = Authenticator(frozenset({"u1"}), frozenset())
    assert plain.principal("Bearer u1") == derived_principal("u1")
    off = Authenticator(frozenset(), frozenset())
    assert off.principal(None) == "" and off.check(MODEL_RPC, None) == (None, "")


def test_quota_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServerConfig().quota_completions_per_minute == 0  # no limit by default
    monkeypatch.setenv("INSTRUCTLOOP_QUOTA_COMPLETIONS_PER_MINUTE", "30")
    monkeypatch.setenv("INSTRUCTLOOP_QUOTA_TOKENS_PER_MINUTE", "5000")
    monkeypatch.setenv("INSTRUCTLOOP_QUOTA_FEEDBACK_PER_MINUTE", "100")
    cfg = ServerConfig.from_env()
    assert (
        cfg.quota_completions_per_minute,
        cfg.quota_tokens_per_minute,
        cfg.quota_feedback_per_minute,
    ) == (30, 5000, 100)
    assert ServerConfig.from_env(quota_tokens_per_minute=7).quota_tokens_per_minute == 7
    monkeypatch.setenv("INSTRUCTLOOP_QUOTA_TOKENS_PER_MINUTE", "lots")
    with pytest.raises(ConfigError, match="INSTRUCTLOOP_QUOTA_TOKENS_PER_MINUTE"):
        ServerConfig.from_env()
    with pytest.raises(ConfigError, match="quota_feedback_per_minute must not be negative"):
        ServerConfig(quota_feedback_per_minute=-1).validate()


def test_retry_after() -> None:
    # This window alone is at the limit: the rest of it, then until the weighted count falls.
    assert retry_after(cur=10, prev=0, limit=10, elapsed=15, window=60) == 45
    assert retry_after(cur=20, prev=0, limit=10, elapsed=15, window=60) == 45 + 30
    # Under the limit now, the previous window's weight is what must fall: 12 * (1 - t/60) + 4
    # < 10 from t = 30 on.
    assert retry_after(cur=4, prev=12, limit=10, elapsed=20, window=60) == 10
    assert retry_after(cur=4, prev=12, limit=10, elapsed=59.5, window=60) == 1  # never 0


def test_retry_hint_metadata() -> None:
    import grpc

    f = RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, "over", retry_after_s=2.2)
    assert f.trailing_metadata == (("retry-after", "3"), ("grpc-retry-pushback-ms", "3000"))
    assert RpcFailure(grpc.StatusCode.NOT_FOUND, "x").trailing_metadata == ()


def test_undecodable_bodies_become_one_line_reasons() -> None:
    decode = _tolerant(completion_pb2.CompletionRequest.FromString)
    assert decode is not None
    ok = decode(completion_pb2.CompletionRequest(prompt="hi").SerializeToString())
    assert isinstance(ok, completion_pb2.CompletionRequest) and ok.prompt == "hi"
    for body in (b"\x0a\x03ok\xff", b"\x01\x02\x03", b"\x0a\x7f"):
        bad = decode(body)
        assert isinstance(bad, _Undecodable)
        assert "\n" not in bad.reason and "CompletionRequest" in bad.reason
    assert "bad UTF-8" in decode(b"\x0a\x03ok\xff").reason  # type: ignore[union-attr]
