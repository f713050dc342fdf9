"""`instructloop` verbs of the training loop: worker, beat, cycle run/cancel/status, model register.

Imports stay inside the handlers so `instructloop --help` stays quick. `register(sub)` is called
from training/cli.py.

- `instructloop worker`: a Celery worker on the `training` queue, one task at a time
  (training/celery_app.py says why), Prometheus metrics on --metrics-port.
- `instructloop beat`: the schedule. It runs only while it holds a Redis lock; a second beat
  waits as a hot standby (or exits with --no-wait). Every --tick seconds it sends a tick task
  that starts a cycle when --every seconds have passed since the last one, or --threshold new
  rankings/comparisons arrived since the last reward model.
- `instructloop cycle run [--wait]`: start a cycle now. Only one cycle runs at a time: while
  one runs, `cycle run` is refused (exit 1) and names it; run it again afterwards (a queued
  second cycle would only retrain on the data the first one just used).
- `instructloop cycle cancel [ID]`, `instructloop cycle status [ID]`.
- `instructloop model register PATH`: add a checkpoint directory to the registry; prints its
  version.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_REJECTED = 0, 1, 3


def _add_redis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--redis-url",
        default=None,
        help="Redis for broker, results and loop state (default: $REDIS_URL, else the running "
        "`instructloop up`'s, else redis://127.0.0.1:6379/0)",
    )
    p.add_argument("--prefix", default=None, help="Redis key prefix (default: il:)")


def _loop_env(args: argparse.Namespace) -> dict[str, str]:
    """The loop's settings from the flags; with no Redis named (flag or $REDIS_URL), the running
    `instructloop up`'s Redis and key prefix (instructloop/running.py)."""
    from instructloop.running import read_running

    env: dict[str, str] = {}
    if getattr(args, "redis_url", None):
        env["REDIS_URL"] = args.redis_url
    elif not os.environ.get("REDIS_URL"):
        loop = read_running()
        if loop is not None:
            env["REDIS_URL"] = loop.redis_url
            if not os.environ.get("INSTRUCTLOOP_KEY_PREFIX"):
                env["INSTRUCTLOOP_KEY_PREFIX"] = loop.key_prefix
    if getattr(args, "prefix", None):
        env["INSTRUCTLOOP_KEY_PREFIX"] = args.prefix
    return env


def _loop_config(args: argparse.Namespace) -> Any:
    from instructloop.training.celery_app import LoopConfig

    env = dict(os.environ)
    env.update(_loop_env(args))
    return LoopConfig.from_env(env)


def _err(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_FAILED


# --- worker -------------------------------------------------------------------------------------


def _worker(args: argparse.Namespace) -> int:
    """Replace this process with `celery worker`, its environment set first (the loop config
    and PROMETHEUS_MULTIPROC_DIR must be in place before celery and prometheus_client load)."""
    try:
        cfg = _loop_config(args)
    except ValueError as e:
        return _err(str(e))
    env = dict(os.environ)
    env.update(_loop_env(args))
    env.update(cfg.to_env())
    env["REDIS_URL"] = cfg.redis_url
    env["INSTRUCTLOOP_WORKER_METRICS_PORT"] = str(args.metrics_port)
    mp_dir = Path(args.metrics_dir or tempfile.mkdtemp(prefix="instructloop-worker-metrics-"))
    from instructloop.training.loop_metrics import MULTIPROC_ENV

    if mp_dir.exists():
        for f in mp_dir.glob("*.db"):  # stale samples of an earlier run would be summed in
            f.unlink()
    mp_dir.mkdir(parents=True, exist_ok=True)
    env[MULTIPROC_ENV] = str(mp_dir)
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [
        sys.executable, "-m", "celery", "-A", "instructloop.training.celery_app", "worker",
        "-Q", cfg.queue, "-c", "1", "-P", args.pool,
        "--prefetch-multiplier", "1",
        "--loglevel", args.loglevel,
        "-n", args.hostname,
        "-E",
    ]  # fmt: skip
    if args.pool == "prefork" and args.max_tasks_per_child:
        cmd += ["--max-tasks-per-child", str(args.max_tasks_per_child)]
    print(
        f"instructloop worker: queue {cfg.queue}, pool {args.pool}, broker {cfg.redis_url}, "
        f"metrics :{args.metrics_port} ({mp_dir})",
        file=sys.stderr,
        flush=True,
    )
    os.execve(sys.executable, cmd, env)
    return EXIT_FAILED  # not reached


# --- beat ---------------------------------------------------------------------------------------


def _beat(args: argparse.Namespace) -> int:
    from instructloop.training.cycle import CycleConfig

    try:
        cycle_cfg = CycleConfig.load(args.cycle_config)
    except ValueError as e:
        return _err(str(e))
    if args.tick <= 0:
        return _err("--tick must be positive")
    os.environ.update(_loop_env(args))  # before training.celery_app builds its app
    try:
        from instructloop.training.celery_app import TICK_TASK, LockedScheduler, app, loop_config
    except ValueError as e:
        return _err(str(e))
    from instructloop.training.cycle import LoopKeys, redis_client
    from instructloop.training.locks import BeatLock

    cfg = loop_config()
    with redis_client(cfg.redis_url) as client:
        lock = BeatLock(client, LoopKeys(cfg.key_prefix).beat, cfg.beat_lock_ttl_s)
        if not lock.acquire():
            holder = lock.holder()
            if args.no_wait:
                return _err(f"another beat is active ({holder}); only one beat may run")
            print(
                f"instructloop beat: another beat is active ({holder}); waiting as standby",
                file=sys.stderr,
                flush=True,
            )
            lock.wait_acquire(poll_s=max(1.0, cfg.beat_lock_ttl_s / 3))
        print(f"instructloop beat: active ({lock.owner})", file=sys.stderr, flush=True)
        schedule = {
            "every_s": float(args.every),
            "threshold": int(args.threshold),
            "min_new": int(args.min_new),
            "tick_s": float(args.tick),
            "beat": lock.owner,
        }
        client.set(LoopKeys(cfg.key_prefix).schedule, json.dumps(schedule))
        try:
            app.conf.beat_schedule = {
                "instructloop-cycle-tick": {
                    "task": TICK_TASK,
                    "schedule": float(args.tick),
                    "kwargs": {
                        "every_s": float(args.every),
                        "threshold": int(args.threshold),
                        "min_new": int(args.min_new),
                        "cycle_config": cycle_cfg.to_dict(),
                    },
                    # A tick that waited in the queue behind a long step is stale.
                    "options": {"queue": cfg.queue, "expires": float(args.tick)},
                }
            }
            LockedScheduler.beat_lock = lock
            from celery.apps.beat import Beat

            Beat(
                app=app,
                scheduler="instructloop.training.celery_app:LockedScheduler",
                max_interval=max(1, cfg.beat_lock_ttl_s // 3),
                loglevel=args.loglevel,
            ).run()
        finally:
            try:
                lock.release()
            except Exception as e:  # Redis gone: the TTL ends the lock
                print(f"instructloop beat: could not release the lock: {e}", file=sys.stderr)
    return EXIT_OK


# --- cycle --------------------------------------------------------------------------------------


def _store(cfg: Any, client: Any) -> Any:
    from instructloop.training.cycle import CycleStore

    return CycleStore(client, cfg.key_prefix, cfg.lock_ttl_s)


def _fmt_step(name: str, st: dict[str, Any]) -> str:
    state = st.get("state", "pending")
    secs = f" {st['seconds']:.1f}s" if "seconds" in st else ""
    tries = f" (attempt {st['attempts']})" if st.get("attempts", 1) > 1 else ""
    err = f": {st['error']}" if st.get("error") else ""
    return f"  {name:<13} {state}{secs}{tries}{err}"


def _print_record(rec: Any, store: Any) -> None:
    from instructloop.training.cycle import STEPS

    print(f"cycle {rec.id}: {rec.state}  (trigger {rec.trigger}, token {rec.token})")
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(rec.created_at))
    print(f"  created {created} UTC", end="")
    if rec.finished_at:
        print(f", took {rec.finished_at - rec.created_at:.1f}s")
    else:
        print()
    if rec.parent_version:
        cand = f" -> candidate {rec.candidate_version}" if rec.candidate_version else ""
        print(f"  from {rec.parent_version}{cand}")
    from instructloop.training.status import format_progress

    for s in STEPS:
        st = rec.steps.get(s, {})
        progress = (
            f"  {format_progress(st.get('progress'))}" if st.get("state") == "running" else ""
        )
        print(_fmt_step(s, st) + progress)
    gate = rec.outputs.get("gate")
    if gate:
        checks = ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in gate["checks"].items())
        print(f"  gate: {'passed' if gate['passed'] else 'failed'} ({checks})")
    if rec.reason:
        print(f"  reason: {rec.reason}")
    holder = store.lock.holder()
    if holder and holder.cycle_id != rec.id:
        print(f"  (the cycle lock is held by {holder.cycle_id})")


def _exit_code(state: str) -> int:
    return {"promoted": EXIT_OK, "rejected": EXIT_REJECTED}.get(state, EXIT_FAILED)


PROGRESS_EVERY_S = 15.0
"""How often `cycle run --wait` prints a long step's progress."""


def _wait(store: Any, cycle_id: str, timeout: float | None) -> int:
    from instructloop.training.cycle import TERMINAL
    from instructloop.training.status import format_progress

    seen: dict[str, str] = {}
    shown, shown_at = "", 0.0
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        rec = store.get(cycle_id)
        if rec is None:
            return _err(f"cycle {cycle_id} disappeared")
        for s, st in rec.steps.items():
            if seen.get(s) != st.get("state"):
                seen[s] = st.get("state", "")
                print(_fmt_step(s, st), file=sys.stderr, flush=True)
        running = rec.steps.get(rec.current_step, {}) if rec.current_step else {}
        line = f"  {rec.current_step:<13} {format_progress(running.get('progress'))}"
        if (
            running.get("progress")
            and line != shown
            and time.monotonic() - shown_at >= PROGRESS_EVERY_S
        ):
            shown, shown_at = line, time.monotonic()
            print(line, file=sys.stderr, flush=True)
        if rec.state in TERMINAL:
            extra = f": {rec.reason}" if rec.reason else ""
            ver = f" {rec.candidate_version}" if rec.state == "promoted" else ""
            print(f"cycle {cycle_id} {rec.state}{ver}{extra}", file=sys.stderr, flush=True)
            return _exit_code(rec.state)
        if deadline is not None and time.monotonic() > deadline:
            return _err(f"cycle {cycle_id} still {rec.state} after {timeout}s (not cancelled)")
        time.sleep(1.0)


def _cycle_run(args: argparse.Namespace) -> int:
    from instructloop.training.cycle import CycleBusy, CycleConfig, redis_client, start_cycle

    try:
        cfg = _loop_config(args)
        cycle_cfg = CycleConfig.load(args.config)
    except ValueError as e:
        return _err(str(e))
    from instructloop.training.celery_app import create_app

    app = create_app(cfg)
    with redis_client(cfg.redis_url) as client:
        try:
            started = start_cycle(
                app,
                client,
                prefix=cfg.key_prefix,
                queue=cfg.queue,
                lock_ttl_s=cfg.lock_ttl_s,
                cfg=cycle_cfg,
                trigger="manual",
            )
        except CycleBusy as e:
            return _err(f"{e}; not starting another (see `instructloop cycle status`)")
        print(started.cycle_id, flush=True)
        if not args.wait:
            return EXIT_OK
        return _wait(_store(cfg, client), started.cycle_id, args.timeout)


def _cycle_cancel(args: argparse.Namespace) -> int:
    from instructloop.training.cycle import cancel_cycle, redis_client

    try:
        cfg = _loop_config(args)
    except ValueError as e:
        return _err(str(e))
    from instructloop.training.celery_app import create_app

    with redis_client(cfg.redis_url) as client:
        store = _store(cfg, client)
        cycle_id = args.cycle_id
        if cycle_id is None:
            holder = store.lock.holder()
            if holder is None:
                return _err("no cycle is running")
            cycle_id = holder.cycle_id
        try:
            state = cancel_cycle(create_app(cfg), store, cycle_id, force=args.force)
        except KeyError:
            return _err(f"no cycle {cycle_id}")
        print(f"cycle {cycle_id}: {state}", flush=True)
        if args.wait and state not in ("cancelled", "promoted", "rejected", "failed"):
            code = _wait(store, cycle_id, args.timeout)
            rec = store.get(cycle_id)
            return EXIT_OK if rec and rec.state == "cancelled" else code
        return EXIT_OK


def _cycle_status(args: argparse.Namespace) -> int:
    from instructloop.training.cycle import redis_client

    try:
        cfg = _loop_config(args)
    except ValueError as e:
        return _err(str(e))
    with redis_client(cfg.redis_url) as client:
        store = _store(cfg, client)
        if args.list:
            for cid in store.recent(args.list):
                rec = store.get(cid)
                if rec:
                    print(f"{rec.id}  {rec.state:<10} {rec.trigger:<9} {rec.reason}")
            return EXIT_OK
        rec = store.get(args.cycle_id) if args.cycle_id else store.latest()
        if rec is None:
            return _err(f"no cycle {args.cycle_id}" if args.cycle_id else "no cycle has run yet")
        if args.json:
            print(json.dumps(rec.to_dict(), indent=1))
        else:
            _print_record(rec, store)
    return EXIT_OK


# --- status -------------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    import redis
    from instructloop.training.cycle import redis_client
    from instructloop.training.status import gather, render

    from instructloop.registry import RegistryError
    from instructloop.running import read_running, resolve_redis_url

    try:
        cfg = _loop_config(args)
    except ValueError as e:
        return _err(str(e))
    _, source = resolve_redis_url(args.redis_url)
    running = read_running()
    try:
        with redis_client(cfg.redis_url) as client:
            st = gather(client, cfg.key_prefix, running=running, last=args.last)
    except (redis.RedisError, RegistryError) as e:
        hint = " (is `instructloop up` running? else give --redis-url)"
        return _err(
            f"Redis at {cfg.redis_url} ({source}): {e}{hint if source == 'default' else ''}"
        )
    if args.json:
        print(json.dumps(st, indent=1, default=str))
    else:
        print(render(st))
    return EXIT_OK


# --- model register -----------------------------------------------------------------------------


def _model_list(args: argparse.Namespace) -> int:
    import redis

    from instructloop.registry import ModelRegistry, RegistryError

    try:
        cfg = _loop_config(args)
    except ValueError as e:
        return _err(str(e))
    reg = ModelRegistry(cfg.redis_url, prefix=cfg.key_prefix)
    try:
        live = reg.live()
        versions = reg.list()
    except (RegistryError, redis.RedisError) as e:
        return _err(str(e))
    finally:
        reg.close()
    if args.json:
        print(json.dumps([v.to_dict() for v in versions], indent=1, default=str))
        return EXIT_OK
    if not versions:
        print("no versions registered (`instructloop up` registers the default model)")
    for v in versions:
        mark = "*" if live is not None and v.version == live.version else " "
        lineage = f" from {v.parent}" if v.parent else ""
        gate = f", gate {v.gate}" if v.gate else ""
        print(f"{mark} {v.version:<5} {v.source}{lineage}{gate}  {v.path}")
    return EXIT_OK


def _model_register(args: argparse.Namespace) -> int:
    from instructloop.training import loop_adapters

    try:
        cfg = _loop_config(args)
    except ValueError as e:
        return _err(str(e))
    try:
        version = loop_adapters.register_checkpoint(
            cfg.redis_url, cfg.key_prefix, str(args.path), source=args.source
        )
    except Exception as e:  # RegistryError subclasses carry a precise message
        return _err(str(e))
    print(version)
    return EXIT_OK


# --- parser -------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `worker`, `beat`, `cycle` and `model register` to the top-level parser."""
    w = sub.add_parser(
        "worker",
        help="run a training worker (Celery, queue 'training', one task at a time)",
        description="A Celery worker for the training loop's queue: one task at a time, late "
        "acks, prefetch 1; heavy steps run in a subprocess. Scale out with more workers.",
    )
    _add_redis_args(w)
    w.add_argument(
        "--pool",
        choices=("prefork", "solo"),
        default="prefork",
        help="prefork (default): tasks run in a child process, the worker survives its death; "
        "solo: one process",
    )
    w.add_argument("--metrics-port", type=int, default=9109, help="Prometheus port (0: off)")
    w.add_argument("--metrics-dir", default=None, help="PROMETHEUS_MULTIPROC_DIR (default: temp)")
    w.add_argument("--hostname", default="instructloop@%h", help="Celery node name")
    w.add_argument("--loglevel", default="INFO")
    w.add_argument(
        "--max-tasks-per-child", type=int, default=0, help="recycle the pool child (0: never)"
    )
    w.set_defaults(func=_worker)

    b = sub.add_parser(
        "beat",
        help="run the cycle schedule (only one beat is active; others wait)",
        description="Send a tick every --tick seconds; a tick starts a cycle when --every "
        "seconds passed since the last cycle (and some feedback is new), or when --threshold "
        "rankings/comparisons arrived since the last reward model. Holds a Redis lock: a "
        "second beat waits until the first is gone (or exits with --no-wait).",
    )
    _add_redis_args(b)
    b.add_argument("--every", type=float, default=3600.0, help="schedule period, s (0: off)")
    b.add_argument(
        "--threshold", type=int, default=0, help="new rankings+comparisons that start a cycle "
        "(0: off)"
    )  # fmt: skip
    b.add_argument("--min-new", type=int, default=1, help="new feedback a scheduled cycle needs")
    b.add_argument("--tick", type=float, default=60.0, help="how often to check, s")
    b.add_argument("--cycle-config", default=None, help="JSON CycleConfig for started cycles")
    b.add_argument("--no-wait", action="store_true", help="exit if another beat is active")
    b.add_argument("--loglevel", default="INFO")
    b.set_defaults(func=_beat)

    c = sub.add_parser("cycle", help="start, cancel and inspect training cycles")
    csub = c.add_subparsers(dest="cycle_cmd", required=True, metavar="VERB")
    run = csub.add_parser(
        "run",
        help="start a cycle now",
        description="Start a cycle (snapshot, reward model, PPO-ptx, evaluate, gate, promote) "
        "on the workers. Prints the cycle id. Refused (exit 1) while another cycle runs. "
        "With --wait: exit 0 promoted, 3 rejected by the gate, 1 failed or cancelled.",
    )
    _add_redis_args(run)
    run.add_argument("--config", default=None, help="JSON CycleConfig (training/cycle.py)")
    run.add_argument("--wait", action="store_true", help="follow the cycle until it ends")
    run.add_argument("--timeout", type=float, default=None, help="stop waiting after S seconds")
    run.set_defaults(func=_cycle_run)

    cancel = csub.add_parser(
        "cancel",
        help="cancel a cycle (default: the running one)",
        description="Flag the cycle as cancelled and revoke its tasks; the worker stops the "
        "running step within a heartbeat. The serving model is untouched. --force also ends "
        "it now and frees the lock (for a cycle no worker will pick up).",
    )
    _add_redis_args(cancel)
    cancel.add_argument("cycle_id", nargs="?", default=None)
    cancel.add_argument("--force", action="store_true")
    cancel.add_argument("--wait", action="store_true", help="wait until the cycle has ended")
    cancel.add_argument("--timeout", type=float, default=None)
    cancel.set_defaults(func=_cycle_cancel)

    status = csub.add_parser("status", help="show a cycle (default: the latest)")
    _add_redis_args(status)
    status.add_argument("cycle_id", nargs="?", default=None)
    status.add_argument("--json", action="store_true", help="the whole record as JSON")
    status.add_argument("--list", type=int, default=0, metavar="N", help="the last N cycles")
    status.set_defaults(func=_cycle_status)

    st = sub.add_parser(
        "status",
        help="the loop at a glance: served versions, feedback, the running cycle, the next one",
        description="What is served (the live version and each replica), feedback counts since "
        "the last reward model, the cycle now running with its step and progress, the next "
        "trigger, and the last cycles with their gate figures. Finds a running `instructloop "
        "up` by itself.",
    )
    _add_redis_args(st)
    st.add_argument("--json", action="store_true", help="everything as JSON")
    st.add_argument("--last", type=int, default=5, metavar="N", help="past cycles to show (5)")
    st.set_defaults(func=_status)

    model = sub.choices.get("model")
    msub = model.get_default("_model_sub") if model is not None else None
    if msub is None:  # no `model` command yet: make one
        model = sub.add_parser("model", help="register and inspect models")
        msub = model.add_subparsers(dest="model_cmd", required=True, metavar="VERB")
    reg = msub.add_parser(
        "register",
        help="add an existing checkpoint directory to the registry; prints its version",
        description="Register a Hugging Face safetensors directory (lineage from its "
        "manifest.json if it has one). The same directory with the same content keeps its "
        "version. Does not make it live.",
    )
    _add_redis_args(reg)
    ls = msub.add_parser(
        "list",
        help="the registered versions, newest first (* marks the live one)",
        description="Every registered version with its source, parent and gate result.",
    )
    _add_redis_args(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_model_list)
    reg.add_argument("path", type=Path)
    reg.add_argument("--source", default="register", help="how it was made (default: register)")
    reg.set_defaults(func=_model_register)
