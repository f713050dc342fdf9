"""`instructloop status`: the whole loop on one screen, read from Redis.

What is served (the live version and each replica's own report), the feedback since the last
reward model, the cycle now running with its step and progress, when the next cycle starts, and
how the last cycles ended with their gate figures. `gather` returns it as one JSON-ready dict;
`render` prints it for a terminal.
"""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from instructloop.registry import ModelRegistry
from instructloop.running import RunningLoop
from instructloop.training.loop.config import STEPS
from instructloop.training.loop.store import TERMINAL, CycleRecord, CycleStore, text

# The gate figures worth a line each (stages.py: evaluate's names).
GATE_FIGURES = (
    ("win_rate_rm", "win rate (RM)"),
    ("win_rate_judge", "win rate (judge)"),
    ("constraint_accuracy_candidate", "constraints"),
    ("ptx_loss_candidate", "ptx loss"),
)


def gather(
    client: redis.Redis, prefix: str, *, running: RunningLoop | None = None, last: int = 5
) -> dict[str, Any]:
    store = CycleStore(client, prefix)
    registry = ModelRegistry(client, prefix=prefix)
    live = registry.live_state()
    stats = store.feedback_stats()
    rm = store.last_reward_model()
    holder = store.lock.holder()
    current = store.get(holder.cycle_id) if holder else None
    recent = [r for r in (store.get(c) for c in store.recent(last)) if r is not None]
    return {
        "at": time.time(),
        "up": None if running is None else running.__dict__,
        "serving": {
            "live": None
            if live is None
            else {"version": live.model.version, "path": live.model.path, "since": live.since},
            "replicas": registry.replicas(),
        },
        "feedback": {
            "completions": stats.get("completions", 0),
            **{k: stats.get(f"feedback:{k}", 0) for k in ("ranking", "comparison", "rating")},
            "new_since_last_reward_model": store.new_feedback_since_last_rm(),
            "last_reward_model": rm or None,
        },
        "cycle": None if current is None or current.state in TERMINAL else _cycle(current),
        "next": _next_trigger(client, store),
        "recent": [_cycle(r) for r in recent if r.state in TERMINAL],
    }


def _cycle(rec: CycleRecord) -> dict[str, Any]:
    gate = rec.outputs.get("gate") or {}
    metrics = (rec.outputs.get("evaluate") or {}).get("metrics", {})
    step = rec.current_step
    return {
        "id": rec.id,
        "state": rec.state,
        "trigger": rec.trigger,
        "created_at": rec.created_at,
        "finished_at": rec.finished_at,
        "parent": rec.parent_version,
        "candidate": rec.candidate_version,
        "step": step,
        "progress": rec.steps.get(step, {}).get("progress") if step else None,
        "steps_done": [s for s in STEPS if rec.steps.get(s, {}).get("state") == "done"],
        "reason": rec.reason,
        "gate": {"passed": gate.get("passed"), "checks": gate.get("checks", {})} if gate else None,
        "figures": {k: metrics[k] for k, _ in GATE_FIGURES if k in metrics},
        "baseline": {
            k: metrics[k.replace("candidate", "serving")]
            for k, _ in GATE_FIGURES
            if "candidate" in k and k.replace("candidate", "serving") in metrics
        },
    }


def _next_trigger(client: redis.Redis, store: CycleStore) -> dict[str, Any]:
    """What starts the next cycle: the active beat's schedule and threshold, or nothing."""
    if not client.exists(store.keys.beat):
        return {"beat": None}
    try:
        sched = json.loads(text(client.get(store.keys.schedule) or b"{}"))
    except ValueError:
        sched = {}
    out: dict[str, Any] = {"beat": sched.get("beat", "active"), **sched}
    every = float(sched.get("every_s", 0) or 0)
    last = client.get(store.keys.last_started)
    if every > 0 and last is not None:
        out["scheduled_at"] = float(text(last)) + every
    return out


# --- rendering ----------------------------------------------------------------------------------


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "-"
    d = now - t
    if d < 0:
        return f"in {_span(-d)}"
    return f"{_span(d)} ago"


def _span(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def format_progress(p: dict[str, Any] | None) -> str:
    """A step's progress in one line: stage, epoch, step i/N and its last figures."""
    if not p:
        return ""
    figures = ", ".join(
        f"{k} {v:.3g}" for k, v in p.items() if k in ("loss", "accuracy", "reward", "kl")
    )
    epoch = f" epoch {int(p['epoch']) + 1}" if "epoch" in p else ""
    text = f"{p.get('stage', '')}{epoch} step {p.get('step', 0)}/{p.get('total', '?')}"
    return text + (f" ({figures})" if figures else "")


def render(st: dict[str, Any]) -> str:
    """`gather`'s dict as lines for a terminal: the loop, serving, feedback, the cycle running,
    the next trigger and the last cycles."""
    now = st["at"]
    out: list[str] = []
    _render_up(out, st.get("up"), now)
    _render_serving(out, st["serving"], now)
    fb = st["feedback"]
    out.append(
        f"feedback: {fb['completions']} completions, {fb['ranking']} rankings, "
        f"{fb['comparison']} comparisons, {fb['rating']} ratings; "
        f"{fb['new_since_last_reward_model']} new rankings/comparisons since the last reward model"
    )
    cyc = st["cycle"]
    if cyc is None:
        out.append("cycle: none running")
    else:
        out.append(
            f"cycle: {cyc['id']} {cyc['state']} ({cyc['trigger']}, started "
            f"{_ago(cyc['created_at'], now)}), step {cyc['step'] or '-'} "
            f"{format_progress(cyc['progress'])}".rstrip()
        )
    _render_next(out, st["next"], fb["new_since_last_reward_model"], now)
    _render_recent(out, st["recent"])
    return "\n".join(out)


def _render_up(out: list[str], up: dict[str, Any] | None, now: float) -> None:
    if not up:
        return
    out.append(
        f"loop: instructloop up (pid {up['pid']}, {_span(now - up['started_at'])} up), "
        f"gRPC {up['grpc']}, Redis {up['redis_url']}"
    )
    if up.get("memory"):
        mem = ", ".join(f"{k} {v:g}" for k, v in up["memory"].items())
        out.append(f"  memory plan: {mem}")


def _render_serving(out: list[str], serving: dict[str, Any], now: float) -> None:
    live = serving["live"]
    out.append(
        "serving: no live version"
        if live is None
        else f"serving: live {live['version']} since {_ago(live['since'], now)} ({live['path']})"
    )
    reps = serving["replicas"]
    if not reps:
        out.append("  replicas: none reporting")
    for r in reps:
        state = "" if r.get("engine_up", True) else ", ENGINE DOWN"
        behind = (
            f", BEHIND live ({r['swap_error']})"
            if r.get("swap_error")
            else (", pinned" if not r.get("follows_live", True) else "")
        )
        if r.get("fallback"):  # the live version would not load when it started
            behind = f", FALLBACK ({r['fallback']})" + behind
        out.append(f"  {r['replica_id']}: {r['version']} on {r.get('address', '?')}{state}{behind}")


def _render_next(out: list[str], nxt: dict[str, Any], have: int, now: float) -> None:
    if nxt.get("beat") is None:
        out.append("next cycle: no beat running; `instructloop cycle run` starts one by hand")
        return
    parts = []
    if "scheduled_at" in nxt:
        parts.append(f"on schedule {_ago(nxt['scheduled_at'], now)}")
    elif nxt.get("every_s"):
        parts.append(f"every {_span(nxt['every_s'])}")
    if nxt.get("threshold"):
        parts.append(f"at {nxt['threshold']} new rankings/comparisons ({have} so far)")
    out.append("next cycle: " + (", or ".join(parts) or "beat running, no trigger set"))


def _render_recent(out: list[str], recent: list[dict[str, Any]]) -> None:
    if recent:
        out.append("last cycles:")
    for c in recent:
        figs = ", ".join(
            f"{label} {c['figures'][k]:.3f}"
            + (f" (was {c['baseline'][k]:.3f})" if k in c["baseline"] else "")
            for k, label in GATE_FIGURES
            if k in c["figures"]
        )
        target = f" -> {c['candidate']}" if c["candidate"] else ""
        reason = f": {c['reason']}" if c["reason"] else ""
        out.append(f"  {c['id']} {c['state']}{target}{reason}")
        if figs:
            out.append(f"    {figs}")
