"""Labeller keys, the third key role: configured like the others, allowed the labelling service
only, and the labelling service refused to user keys (unit tests, no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from instructloop.errors import ConfigError
from instructloop.serving.auth import Authenticator
from instructloop.serving.config import ServerConfig

LABEL = "/instructloop.v1.LabelingService/NextTask"
COMPLETE = "/instructloop.v1.CompletionService/Complete"
FEEDBACK = "/instructloop.v1.FeedbackService/SubmitRanking"
MODEL = "/instructloop.v1.ModelService/PromoteModel"


def md(key: str) -> list[tuple[str, object]]:
    return [("authorization", f"Bearer {key}")]


def test_each_role_calls_what_it_may() -> None:
    auth = Authenticator({"u": "app"}, {"a": "ops"}, {"l": "alice"})
    allowed = {
        "u": {COMPLETE, FEEDBACK},
        "a": {COMPLETE, FEEDBACK, MODEL, LABEL},
        "l": {LABEL},
    }
    refusals = {"u": {LABEL: "labeller", MODEL: "admin"}, "l": {MODEL: "admin"}}
    for key, ok in allowed.items():
        for method in (LABEL, COMPLETE, FEEDBACK, MODEL):
            deny, principal = auth.check(method, md(key))
            if method in ok:
                assert deny is None, (key, method)
                assert principal == {"u": "app", "a": "ops", "l": "alice"}[key]
            else:
                want = refusals.get(key, {}).get(method, "labelling-only")
                assert deny == want, (key, method, deny)
    assert auth.identify("Bearer l") == ("labeller", "alice")
    assert auth.check(LABEL, md("nope"))[0] == "key"
    # only labeller keys configured: authentication is on
    assert Authenticator((), (), {"l": "alice"}).enabled


def test_labeller_keys_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team\nlabeller carol:c-key\nuser app:u-key\n")
    monkeypatch.setenv("INSTRUCTLOOP_LABELLER_KEYS", "alice:a-key, b-key")
    cfg = ServerConfig.from_env(api_keys_file=keys)
    users, admins, labellers = cfg.key_roles()
    assert labellers == {"a-key": "alice", "b-key": labellers["b-key"], "c-key": "carol"}
    assert labellers["b-key"].startswith("key-")
    assert users == {"u-key": "app"} and admins == {}
    assert cfg.labeller_principals() == labellers
    assert cfg.key_principals() == (users, admins)


@pytest.mark.parametrize(
    "kw",
    [
        {"api_keys": ("same",), "labeller_keys": ("same",)},
        {"admin_keys": ("x:same",), "labeller_keys": ("x:same",)},
        {"labeller_keys": ("alice:k", "bob:k")},
    ],
)
def test_a_labeller_key_has_one_role(kw: dict[str, tuple[str, ...]]) -> None:
    with pytest.raises(ConfigError):
        ServerConfig(**kw).validate()  # type: ignore[arg-type]


def test_labelling_settings_are_checked() -> None:
    for bad in ({"label_lease_s": 0}, {"labels_per_task": 0}):
        with pytest.raises(ConfigError):
            ServerConfig(**bad).validate()  # type: ignore[arg-type]
