"""The cycle's bookkeeping without a worker: configs, gate, triggers, fencing of the promotion,
cancellation and idempotence, on a real Redis and the real registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from instructloop.registry import ModelRegistry
from instructloop.training.loop.config import STEPS, CycleConfig, LoopConfig
from instructloop.training.loop.locks import Holder
from instructloop.training.loop.runner import run_step
from instructloop.training.loop.steps import gate_checks
from instructloop.training.loop.store import CycleStore
from instructloop.training.loop.triggers import due_trigger
from tests.support.models import build_tiny_llama
from tests.support.records import seed_feedback


def _run(step: str, cycle_id: str, token: int, redis_client: Any, redis_url: str) -> Any:
    return run_step(
        step,
        cycle_id,
        token,
        client=redis_client,
        redis_url=redis_url,
        prefix="il:",
        lock_ttl_s=60,
        heartbeat_s=1,
        step_time_limit_s=60,
    )


def _cycle_at_promote(
    store: CycleStore, cycle_id: str, cfg: CycleConfig, parent: str, candidate: str, passed: bool
) -> int:
    """A cycle whose steps up to the gate are recorded as done (hand-written outputs)."""
    token = store.lock.acquire(cycle_id)
    assert token is not None
    store.create(cycle_id, token, "manual", cfg)
    outs = {
        "snapshot": {"parent_version": parent, "parent_path": "/x", "snapshot_id": "snap-1"},
        "reward_model": {"path": "/rm", "metrics": {}},
        "ppo": {"path": "/ppo", "metrics": {}},
        "evaluate": {"metrics": {}},
        "gate": {"passed": passed, "checks": {"win_rate_rm": passed}, "version": candidate},
    }
    fields = {f"out:{k}": json.dumps(v) for k, v in outs.items()}
    assert store.lock.fenced_hset(Holder(cycle_id, token), {store.keys.cycle(cycle_id): fields})
    return token


@pytest.fixture
def two_versions(redis_client: Any, redis_url: str, tiny_policy: Path, tmp_path: Path) -> tuple:
    """v1 live (the tiny policy), v2 registered with a passed gate (other weights)."""
    other = build_tiny_llama(tmp_path / "other", tiny_policy, seed=1)
    reg = ModelRegistry(redis_url)
    v1 = reg.ensure_live(tiny_policy).version
    v2 = reg.register(other, source="ppo", parent=v1, gate="passed").version
    yield reg, v1, v2
    reg.close()


def test_configs_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown cycle config field"):
        CycleConfig.from_dict({"gate_min_winrate": 0.5})
    with pytest.raises(ValueError, match="must be in"):
        CycleConfig.from_dict({"gate_min_win_rate_rm": 1.5})
    with pytest.raises(ValueError, match="max_user_share"):
        CycleConfig.from_dict({"snapshot_max_user_share": 0})
    with pytest.raises(ValueError, match="must exceed"):
        LoopConfig(step_time_limit_s=100, visibility_timeout_s=100)
    cfg = LoopConfig.from_env({"REDIS_URL": "redis://h:1/2", "INSTRUCTLOOP_HEARTBEAT_S": "2.5"})
    assert cfg.redis_url == "redis://h:1/2"
    assert cfg.heartbeat_s == 2.5
    assert cfg.lock_ttl_s == cfg.visibility_timeout_s + 2 * cfg.restore_interval_s + 60
    assert LoopConfig.from_env(cfg.to_env()) == cfg


def test_gate_checks_each_threshold() -> None:
    cfg = CycleConfig(
        gate_min_win_rate_rm=0.55,
        gate_min_win_rate_judge=0.5,
        gate_max_ptx_loss_increase=0.1,
        gate_max_constraint_accuracy_drop=0.05,
    )
    m = {
        "win_rate_rm": 0.6,
        "win_rate_judge": 0.5,
        "ptx_loss_candidate": 2.15,
        "ptx_loss_serving": 2.0,  # +0.15 > 0.1: fails
        "constraint_accuracy_candidate": 0.70,
        "constraint_accuracy_serving": 0.74,  # -0.04: within 0.05
    }
    assert gate_checks(cfg, m) == {
        "win_rate_rm": True,
        "win_rate_judge": True,
        "ptx_loss": False,
        "constraint_accuracy": True,
    }
    m["win_rate_rm"] = 0.54
    m["ptx_loss_candidate"] = 2.05
    assert gate_checks(cfg, m)["win_rate_rm"] is False
    assert gate_checks(cfg, m)["ptx_loss"] is True
    with pytest.raises(Exception, match="missing win_rate_judge"):
        gate_checks(cfg, {k: v for k, v in m.items() if k != "win_rate_judge"})


def test_threshold_and_schedule_triggers(redis_client: Any, redis_url: str) -> None:
    store = CycleStore(redis_client, "il:", 60)
    assert due_trigger(store, every_s=3600, threshold=5, min_new=1, now=1000.0) is None
    seed_feedback(redis_url, n=3)
    assert store.new_feedback_since_last_rm() == 3
    assert due_trigger(store, every_s=0, threshold=5, min_new=1) is None
    seed_feedback(redis_url, n=2)
    assert due_trigger(store, every_s=0, threshold=5, min_new=1) == "threshold"
    # a reward model trained on a snapshot holding those 5 moves the baseline
    redis_client.hset(store.keys.reward_model, mapping={"path": "/rm", "feedback_count": 5})
    assert store.new_feedback_since_last_rm() == 0
    assert due_trigger(store, every_s=0, threshold=5, min_new=1) is None
    # schedule: due every_s after the last start, and only with new feedback
    seed_feedback(redis_url, n=1)
    redis_client.set(store.keys.last_started, 1000.0)
    assert due_trigger(store, every_s=3600, threshold=0, min_new=1, now=1000.0 + 3599) is None
    assert due_trigger(store, every_s=3600, threshold=0, min_new=1, now=1000.0 + 3600) == (
        "schedule"
    )
    assert due_trigger(store, every_s=3600, threshold=0, min_new=2, now=1000.0 + 3600) is None


def test_promote_with_current_token_goes_live(
    redis_client: Any, redis_url: str, two_versions: tuple, tmp_path: Path
) -> None:
    reg, v1, v2 = two_versions
    store = CycleStore(redis_client, "il:", 60)
    cfg = CycleConfig(work_dir=str(tmp_path))
    token = _cycle_at_promote(store, "cyc-a", cfg, v1, v2, passed=True)
    res = _run("promote", "cyc-a", token, redis_client, redis_url)
    assert res.status == "done"
    assert reg.live().version == v2
    rec = store.get("cyc-a")
    assert rec is not None and rec.state == "promoted"
    assert store.lock.holder() is None  # released at the end
    # a redelivered promote finds its output and changes nothing
    assert _run("promote", "cyc-a", token, redis_client, redis_url).status == "stopped"
    assert reg.history() == [v1]


def test_stale_fencing_token_cannot_promote(
    redis_client: Any, redis_url: str, two_versions: tuple, tmp_path: Path
) -> None:
    reg, v1, v2 = two_versions
    store = CycleStore(redis_client, "il:", 60)
    cfg = CycleConfig(work_dir=str(tmp_path))
    old = _cycle_at_promote(store, "cyc-old", cfg, v1, v2, passed=True)
    redis_client.delete(store.keys.lock)  # the old cycle's lock expired ...
    new = store.lock.acquire("cyc-new")  # ... and a newer cycle holds it now
    assert new == old + 1
    res = _run("promote", "cyc-old", old, redis_client, redis_url)
    assert res.status == "stopped"
    assert reg.live().version == v1  # untouched
    rec = store.get("cyc-old")
    assert rec is not None and rec.state == "failed"
    assert "fenced out" in rec.reason and "cyc-new" in rec.reason
    assert store.output("cyc-old", "promote") is None
    assert store.lock.holder() == Holder("cyc-new", new)  # the newer cycle keeps its lock


def test_gate_failed_is_rejected_and_nothing_goes_live(
    redis_client: Any, redis_url: str, two_versions: tuple, tmp_path: Path
) -> None:
    reg, v1, v2 = two_versions
    store = CycleStore(redis_client, "il:", 60)
    token = _cycle_at_promote(
        store, "cyc-r", CycleConfig(work_dir=str(tmp_path)), v1, v2, passed=False
    )
    assert _run("promote", "cyc-r", token, redis_client, redis_url).status == "done"
    rec = store.get("cyc-r")
    assert rec is not None and rec.state == "rejected"
    assert "win_rate_rm" in rec.reason
    assert reg.live().version == v1


def test_live_version_changed_during_cycle_is_not_overridden(
    redis_client: Any, redis_url: str, two_versions: tuple, tmp_path: Path
) -> None:
    reg, v1, v2 = two_versions
    store = CycleStore(redis_client, "il:", 60)
    token = _cycle_at_promote(
        store, "cyc-p", CycleConfig(work_dir=str(tmp_path)), "v9", v2, passed=True
    )
    with pytest.raises(Exception, match="live version changed"):
        _run("promote", "cyc-p", token, redis_client, redis_url)
    rec = store.get("cyc-p")
    assert rec is not None and rec.state == "failed" and rec.failed_step == "promote"
    assert reg.live().version == v1


def test_cancelled_cycle_runs_no_step(
    redis_client: Any, redis_url: str, live_v1: str, tmp_path: Path
) -> None:
    store = CycleStore(redis_client, "il:", 60)
    token = store.lock.acquire("cyc-c")
    assert token is not None
    store.create("cyc-c", token, "manual", CycleConfig(work_dir=str(tmp_path)))
    store.request_cancel("cyc-c")
    assert _run("snapshot", "cyc-c", token, redis_client, redis_url).status == "stopped"
    rec = store.get("cyc-c")
    assert rec is not None and rec.state == "cancelled"
    assert rec.steps == {}  # the step never started
    assert store.lock.holder() is None
    assert not (tmp_path / "cyc-c").exists()


def test_snapshot_step_is_idempotent(
    redis_client: Any, redis_url: str, live_v1: str, tmp_path: Path
) -> None:
    fb = seed_feedback(redis_url, n=3)
    store = CycleStore(redis_client, "il:", 60)
    token = store.lock.acquire("cyc-s")
    assert token is not None
    store.create("cyc-s", token, "manual", CycleConfig(work_dir=str(tmp_path)))
    assert _run("snapshot", "cyc-s", token, redis_client, redis_url).status == "done"
    out = store.output("cyc-s", "snapshot")
    assert out is not None
    assert out["parent_version"] == live_v1
    assert out["feedback_ids"] == 3 and out["feedback_count"] == 3
    # who supplied the preferences, for the poisoning limits (feedback/poisoning.py)
    users = out["sources"]["users"]
    assert out["sources"]["dropped"] == 0 and sum(u["kept"] for u in users.values()) == 3
    manifest = json.loads((Path(out["dir"]) / "manifest.json").read_text())
    assert manifest["feedback_ids"] == fb
    seed_feedback(redis_url, n=2)  # later feedback does not change a finished snapshot
    assert _run("snapshot", "cyc-s", token, redis_client, redis_url).status == "skipped"
    assert store.output("cyc-s", "snapshot") == out
    assert store.get("cyc-s").steps["snapshot"]["attempts"] == 1  # type: ignore[union-attr]


def test_not_enough_feedback_fails_with_reason(
    redis_client: Any, redis_url: str, live_v1: str, tmp_path: Path
) -> None:
    store = CycleStore(redis_client, "il:", 60)
    token = store.lock.acquire("cyc-e")
    assert token is not None
    store.create("cyc-e", token, "manual", CycleConfig(work_dir=str(tmp_path), min_feedback=2))
    seed_feedback(redis_url, n=1)
    with pytest.raises(Exception, match="not enough feedback"):
        _run("snapshot", "cyc-e", token, redis_client, redis_url)
    rec = store.get("cyc-e")
    assert rec is not None and rec.state == "failed" and rec.failed_step == "snapshot"
    assert rec.steps["snapshot"]["state"] == "failed"
    assert "min_feedback is 2" in rec.reason
    assert store.lock.holder() is None
    assert all(store.output("cyc-e", s) is None for s in STEPS)


def test_resume_stalled_resends_the_rest_of_the_chain_once(
    redis_client: Any, redis_url: str, tmp_path: Path
) -> None:
    from instructloop.training.loop.celery_app import create_app
    from instructloop.training.loop.config import LoopConfig
    from instructloop.training.loop.triggers import resume_stalled

    app = create_app(LoopConfig(redis_url=redis_url))
    store = CycleStore(redis_client, "il:", 60)
    token = store.lock.acquire("cyc-k")
    assert token is not None
    store.create("cyc-k", token, "manual", CycleConfig(work_dir=str(tmp_path)))
    store.set_fields("cyc-k", state="running", current_step="ppo", task_ids=["t1"])
    store.set_step_state("cyc-k", "ppo", {"state": "running", "attempts": 1})
    lease = store.keys.lease("cyc-k", "ppo")
    redis_client.set(lease, "someone", px=60_000)
    assert resume_stalled(app, store, "training") is None  # its execution is alive
    redis_client.delete(lease)  # ... until its lease expires: the execution died
    assert resume_stalled(app, store, "training") == "cyc-k"
    assert resume_stalled(app, store, "training") is None  # once per interrupted attempt
    rec = store.get("cyc-k")
    assert rec is not None and rec.steps["ppo"]["state"] == "interrupted"
    assert len(rec.task_ids) == 1 + 4  # ppo, evaluate, gate, promote sent again
    queued = [json.loads(m) for m in redis_client.lrange("training", 0, -1)]
    assert [m["headers"]["task"] for m in queued] == ["training.cycle.ppo"]
    assert queued[0]["headers"]["id"] == rec.task_ids[1]
    # a cycle waiting between steps (no step running) is left alone
    store.set_step_state("cyc-k", "ppo", {"state": "done", "attempts": 2})
    store.set_fields("cyc-k", current_step="evaluate")
    assert resume_stalled(app, store, "training") is None


def test_model_register_prints_version_and_refuses_bad_paths(
    redis_client: Any, redis_url: str, tiny_policy: Path, tmp_path: Path
) -> None:
    from tests.support.loop import cli, loop_env

    env = loop_env(redis_url)
    first = cli("model", "register", str(tiny_policy), env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "v1"
    again = cli("model", "register", str(tiny_policy), env=env)  # same content: same version
    assert again.stdout.strip() == "v1"
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = cli("model", "register", str(empty), env=env)
    assert bad.returncode == 1 and "no *.safetensors" in bad.stderr
    reg = ModelRegistry(redis_url)
    try:
        assert [m.version for m in reg.list()] == ["v1"]
        assert reg.get("v1").source == "register" and reg.live() is None  # not made live
    finally:
        reg.close()


def test_a_heavy_step_without_the_memory_it_needs_is_refused(
    redis_client: Any, redis_url: str, tmp_path: Path, two_versions: tuple
) -> None:
    """The reward-model step needs more memory than is free: it does not start (no subprocess,
    nothing written), the cycle fails with a message that says so, and the live version stays."""
    from instructloop.training.loop.store import CycleError

    reg, v1, _ = two_versions
    store = CycleStore(redis_client, "il:")
    cfg = CycleConfig(work_dir=str(tmp_path), step_memory_gib={"reward_model": 1e6})
    token = store.lock.acquire("cyc-m")
    assert token is not None
    store.create("cyc-m", token, "manual", cfg)
    snap = {"parent_version": v1, "parent_path": "/x", "snapshot_id": "s", "dir": "/x",
            "feedback_count": 1}  # fmt: skip
    assert store.lock.fenced_hset(
        Holder("cyc-m", token), {store.keys.cycle("cyc-m"): {"out:snapshot": json.dumps(snap)}}
    )
    with pytest.raises(CycleError, match="not enough memory: the reward_model step needs"):
        _run("reward_model", "cyc-m", token, redis_client, redis_url)
    rec = store.get("cyc-m")
    assert rec is not None and rec.state == "failed" and rec.failed_step == "reward_model"
    assert "GiB is available; not starting it" in rec.reason
    assert not list((tmp_path / "cyc-m" / "reward_model").rglob("step.log"))  # never started
    assert reg.live().version == v1
    # A cycle config may lower the recipe's needs (0: no check), for heavy steps only.
    assert CycleConfig(step_memory_gib={"ppo": 0}).step_memory_gib == {"ppo": 0}
    with pytest.raises(ValueError, match="not heavy steps: gate"):
        CycleConfig(step_memory_gib={"gate": 1})
    with pytest.raises(ValueError, match="unknown recipe 'big'"):
        CycleConfig(recipe="big")
