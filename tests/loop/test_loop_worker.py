"""Cycles on real `instructloop worker` processes (Celery, Redis broker), with real training
steps on tiny models: completion and promotion, failure, the one-cycle lock, cancel, a worker
SIGKILLed mid-step and restarted, and the single active beat."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from instructloop.registry import ModelRegistry
from instructloop.training.loop.config import STEPS
from instructloop.training.loop.store import TERMINAL, CycleStore
from tests.support.loop import REPO, cli, loop_env, tiny_cycle_config, wait_for
from tests.support.metrics import metric_value
from tests.support.records import seed_feedback

pytestmark = pytest.mark.slow


def _config_file(tmp_path: Path, **over: Any) -> Path:
    p = tmp_path / f"cycle-{len(list(tmp_path.glob('cycle-*.json')))}.json"
    p.write_text(json.dumps(tiny_cycle_config(tmp_path / "cycles", **over)))
    return p


def _store(redis_client: Any) -> CycleStore:
    return CycleStore(redis_client, "il:", 3600)


def _wait_state(store: CycleStore, cycle_id: str, timeout: float) -> Any:
    def done() -> Any:
        rec = store.get(cycle_id)
        return rec if rec is not None and rec.state in TERMINAL else None

    return wait_for(done, timeout, f"cycle {cycle_id} to end")


def _step_running(store: CycleStore, cycle_id: str, step: str) -> bool:
    rec = store.get(cycle_id)
    return rec is not None and rec.steps.get(step, {}).get("state") == "running"


def step_processes(cycle_id: str) -> list[int]:
    """Pids of processes working on this cycle's heavy steps (the step subprocess and whatever
    it started, e.g. vLLM's engine core, share its process group)."""
    leaders = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"run-step" in cmd and any(cycle_id.encode() in c for c in cmd):
            leaders.add(int(d.name))
    pids = set(leaders)
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) in leaders:
                    pids.add(int(d.name))
            except OSError:
                continue
    return sorted(pids)


def _live(redis_url: str) -> str:
    reg = ModelRegistry(redis_url)
    try:
        mv = reg.live()
        assert mv is not None
        return mv.version
    finally:
        reg.close()


def test_cycle_runs_to_completion_and_promotes(
    redis_client: Any, redis_url: str, live_v1: str, worker_factory: Any, tmp_path: Path
) -> None:
    fb_ids = seed_feedback(redis_url, n=8)
    w = worker_factory()
    env = loop_env(redis_url)
    run = subprocess.Popen(
        [sys.executable, "-m", "instructloop", "cycle", "run", "--wait", "--timeout", "600",
         "--config", str(_config_file(tmp_path))],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    store = _store(redis_client)
    holder = wait_for(store.lock.holder, 60, "the cycle lock to be taken")
    # The lock admits one cycle: a second `cycle run` is refused and names the running one.
    second = cli("cycle", "run", "--config", str(_config_file(tmp_path)), env=env)
    assert second.returncode == 1, second.stderr
    assert holder.cycle_id in second.stderr and "only one cycle" in second.stderr
    out, err = run.communicate(timeout=660)
    assert run.returncode == 0, f"{out}\n{err}\n{w.log()[-4000:]}"
    cycle_id = out.strip().splitlines()[0]
    assert cycle_id == holder.cycle_id

    rec = store.get(cycle_id)
    assert rec is not None and rec.state == "promoted", rec
    assert [rec.steps[s]["state"] for s in STEPS] == ["done"] * len(STEPS)
    assert all(rec.steps[s]["attempts"] == 1 for s in STEPS)
    assert store.lock.holder() is None
    assert len(store.recent(10)) == 1  # the refused run left no record

    # the registry: candidate live, with its lineage
    reg = ModelRegistry(redis_url)
    live = reg.live()
    assert live is not None and live.version == rec.candidate_version != live_v1
    assert live.parent == live_v1 and live.source == "ppo" and live.gate == "passed"
    snap = rec.outputs["snapshot"]
    assert live.data_snapshot == snap["snapshot_id"]
    manifest = json.loads((Path(snap["dir"]) / "manifest.json").read_text())
    assert manifest["feedback_ids"] == fb_ids
    assert Path(live.path) == Path(rec.outputs["ppo"]["path"])
    assert "win_rate_rm" in live.metrics and "rm_accuracy" in live.metrics
    assert reg.history() == [live_v1]
    reg.close()
    # the next cycle warm-starts from this reward model, and counts feedback from here
    assert store.last_reward_model()["path"] == rec.outputs["reward_model"]["path"]
    assert store.new_feedback_since_last_rm() == 0

    status = cli("cycle", "status", env=env)
    assert status.returncode == 0 and "promoted" in status.stdout and cycle_id in status.stdout

    m = w.metrics()
    assert metric_value(m, "instructloop_cycles_total", outcome="promoted") == 1.0
    for s in STEPS:
        assert metric_value(m, "instructloop_celery_tasks_total", task=f"training.cycle.{s}",
                            state="SUCCESS") == 1.0  # fmt: skip
        assert metric_value(m, "instructloop_cycle_step_seconds_count", step=s, outcome="done")
    assert metric_value(m, "instructloop_reward_model_accuracy") is not None
    assert metric_value(m, "instructloop_ppo_kl") is not None
    assert metric_value(m, "instructloop_gate_checks_total", check="win_rate_rm",
                        result="passed") == 1.0  # fmt: skip


@pytest.mark.parametrize("pool", ["prefork", "solo"])
def test_failing_step_leaves_live_untouched_and_records_reason(
    redis_client: Any, redis_url: str, live_v1: str, worker_factory: Any, tmp_path: Path, pool: str
) -> None:
    seed_feedback(redis_url, n=4)
    w = worker_factory(pool)
    env = loop_env(redis_url)
    bad = _config_file(tmp_path, reward_model={"lr": -1.0})  # rejected by the RM stage
    res = cli("cycle", "run", "--wait", "--timeout", "300", "--config", str(bad), env=env,
              timeout=330)  # fmt: skip
    assert res.returncode == 1, res.stderr
    cycle_id = res.stdout.strip()
    rec = _store(redis_client).get(cycle_id)
    assert rec is not None and rec.state == "failed"
    assert rec.failed_step == "reward_model"
    assert "lr must be > 0" in rec.reason
    assert rec.steps["snapshot"]["state"] == "done"
    assert rec.steps["reward_model"]["state"] == "failed"
    assert "ppo" not in rec.steps and "promote" not in rec.outputs
    assert _live(redis_url) == live_v1
    assert _store(redis_client).lock.holder() is None
    assert _store(redis_client).last_reward_model() == {}  # no pointer to a failed RM
    m = w.metrics()
    assert metric_value(m, "instructloop_cycles_total", outcome="failed") == 1.0
    assert (
        metric_value(
            m, "instructloop_cycle_failures_total", step="reward_model", error="CycleError"
        )
        == 1.0
    )
    assert metric_value(m, "instructloop_celery_tasks_total", task="training.cycle.reward_model",
                        state="FAILURE") == 1.0  # fmt: skip
    assert "lr must be > 0" in cli("cycle", "status", cycle_id, env=env).stdout


def test_cancel_stops_the_running_step(
    redis_client: Any, redis_url: str, live_v1: str, worker_factory: Any, tmp_path: Path
) -> None:
    seed_feedback(redis_url, n=8)
    worker_factory()
    env = loop_env(redis_url)
    res = cli("cycle", "run", "--config", str(_config_file(tmp_path)), env=env)
    assert res.returncode == 0, res.stderr
    cycle_id = res.stdout.strip()
    store = _store(redis_client)
    wait_for(lambda: _step_running(store, cycle_id, "reward_model"), 120, "the RM step")
    wait_for(lambda: step_processes(cycle_id), 30, "the RM step's subprocess")

    cancel = cli("cycle", "cancel", "--wait", "--timeout", "60", env=env)
    assert cancel.returncode == 0, cancel.stderr
    rec = store.get(cycle_id)
    assert rec is not None and rec.state == "cancelled"
    assert rec.steps["reward_model"]["state"] == "cancelled"
    assert "reward_model" not in rec.outputs and "ppo" not in rec.steps
    wait_for(lambda: not step_processes(cycle_id), 20, "the step's processes to end")
    assert store.lock.holder() is None
    assert _live(redis_url) == live_v1
    time.sleep(3)  # the revoked rest of the chain never runs
    rec = store.get(cycle_id)
    assert rec is not None and rec.state == "cancelled" and "ppo" not in rec.steps
    # the lock is free again: the next cycle starts (and fails fast on a bad setting)
    nxt = cli("cycle", "run", "--config", str(_config_file(tmp_path, reward_model={"lr": -1})),
              "--wait", "--timeout", "120", env=env, timeout=150)  # fmt: skip
    assert nxt.returncode == 1 and nxt.stdout.strip() != cycle_id


def test_worker_killed_mid_step_resumes_without_redoing_finished_steps(
    redis_client: Any, redis_url: str, live_v1: str, worker_factory: Any, tmp_path: Path
) -> None:
    seed_feedback(redis_url, n=8)
    w1 = worker_factory()
    env = loop_env(redis_url)
    res = cli("cycle", "run", "--config", str(_config_file(tmp_path)), env=env)
    assert res.returncode == 0, res.stderr
    cycle_id = res.stdout.strip()
    store = _store(redis_client)
    wait_for(lambda: _step_running(store, cycle_id, "ppo"), 240, "the PPO step")
    wait_for(lambda: step_processes(cycle_id), 30, "the PPO subprocess")
    time.sleep(8)  # into the step (its rollout engine starting)
    w1.kill()  # SIGKILL: worker, pool child; no ack, no cleanup code runs in them
    # the step's own process group notices its parent died and goes too
    wait_for(lambda: not step_processes(cycle_id), 30, "the orphaned step processes to die")
    rec = store.get(cycle_id)
    assert rec is not None and rec.state == "running" and rec.current_step == "ppo"
    assert _live(redis_url) == live_v1

    w2 = worker_factory()
    rec = _wait_state(store, cycle_id, 900)
    assert rec.state == "promoted", f"{rec}\n{w2.log()[-4000:]}"
    attempts = {s: rec.steps[s]["attempts"] for s in STEPS}
    assert attempts == {s: 2 if s == "ppo" else 1 for s in STEPS}  # finished steps not redone
    assert _live(redis_url) == rec.candidate_version
    assert "resumed cycle" in w2.log()
    ppo_dirs = sorted(p.name for p in (Path(rec.config["work_dir"]) / cycle_id / "ppo").iterdir())
    assert ppo_dirs == ["attempt-2"]  # the interrupted attempt's partial files are gone


def test_beat_lock_admits_one_beat_and_the_beat_triggers_cycles(
    redis_client: Any, redis_url: str, live_v1: str, worker_factory: Any, tmp_path: Path
) -> None:
    seed_feedback(redis_url, n=3)
    worker_factory()
    env = loop_env(redis_url)
    # cycles the beat starts fail fast (bad RM setting): this test is about the triggering
    cfg = _config_file(tmp_path, reward_model={"lr": -1.0})
    procs: list[subprocess.Popen[bytes]] = []

    def beat(*extra: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"beat-{len(procs)}.log"
        with open(log, "wb") as f:
            p = subprocess.Popen(
                [sys.executable, "-m", "instructloop", "beat", "--every", "0", "--threshold", "3",
                 "--tick", "1", "--cycle-config", str(cfg), *extra],
                env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        procs.append(p)
        return p, log

    try:
        a, a_log = beat()
        wait_for(lambda: "beat: active" in a_log.read_text(), 60, "beat A to be active")
        b, b_log = beat("--no-wait")
        assert b.wait(timeout=60) == 1
        assert "another beat is active" in b_log.read_text()
        c, c_log = beat()
        wait_for(lambda: "waiting as standby" in c_log.read_text(), 60, "beat C on standby")
        assert c.poll() is None

        store = _store(redis_client)
        first = wait_for(lambda: store.recent(1), 60, "a cycle started by the beat")[0]
        rec = store.get(first)
        assert rec is not None and rec.trigger == "threshold"

        os.killpg(a.pid, signal.SIGKILL)  # the active beat dies; the standby takes over
        a.wait()
        wait_for(lambda: "beat: active" in c_log.read_text(), 30, "beat C to take over")
        n = len(store.recent(100))
        wait_for(lambda: len(store.recent(100)) > n, 60, "a cycle started by beat C")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
