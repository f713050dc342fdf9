"""`instructloop cycle run | cancel | status` and `instructloop status`.

- `cycle run [--wait]`: start a cycle now. Only one cycle runs at a time: while one runs,
  `cycle run` is refused (exit 1) and names it; run it again afterwards (a queued second cycle
  would only retrain on the data the first one just used).
- `cycle cancel [ID]`, `cycle status [ID]`.
- `status`: the loop at a glance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from instructloop.cli.options import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REJECTED,
    add_redis_args,
    err,
    loop_config,
)


def _store(cfg: Any, client: Any) -> Any:
    from instructloop.training.loop.store import CycleStore

    return CycleStore(client, cfg.key_prefix, cfg.lock_ttl_s)


def _fmt_step(name: str, st: dict[str, Any]) -> str:
    state = st.get("state", "pending")
    secs = f" {st['seconds']:.1f}s" if "seconds" in st else ""
    tries = f" (attempt {st['attempts']})" if st.get("attempts", 1) > 1 else ""
    err = f": {st['error']}" if st.get("error") else ""
    return f"  {name:<13} {state}{secs}{tries}{err}"


def _print_record(rec: Any, store: Any) -> None:
    from instructloop.training.loop.config import STEPS

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
    from instructloop.training.loop.status import format_progress

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
    from instructloop.training.loop.status import format_progress
    from instructloop.training.loop.store import TERMINAL

    seen: dict[str, str] = {}
    shown, shown_at = "", 0.0
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        rec = store.get(cycle_id)
        if rec is None:
            return err(f"cycle {cycle_id} disappeared")
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
            return err(f"cycle {cycle_id} still {rec.state} after {timeout}s (not cancelled)")
        time.sleep(1.0)


def _cycle_run(args: argparse.Namespace) -> int:
    from instructloop.training.loop.config import CycleConfig
    from instructloop.training.loop.store import CycleBusy, redis_client
    from instructloop.training.loop.triggers import start_cycle

    try:
        cfg = loop_config(args)
        cycle_cfg = CycleConfig.load(args.config)
    except ValueError as e:
        return err(str(e))
    from instructloop.training.loop.celery_app import create_app

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
            return err(f"{e}; not starting another (see `instructloop cycle status`)")
        print(started.cycle_id, flush=True)
        if not args.wait:
            return EXIT_OK
        return _wait(_store(cfg, client), started.cycle_id, args.timeout)


def _cycle_cancel(args: argparse.Namespace) -> int:
    from instructloop.training.loop.store import TERMINAL, redis_client
    from instructloop.training.loop.triggers import cancel_cycle

    try:
        cfg = loop_config(args)
    except ValueError as e:
        return err(str(e))
    from instructloop.training.loop.celery_app import create_app

    with redis_client(cfg.redis_url) as client:
        store = _store(cfg, client)
        cycle_id = args.cycle_id
        if cycle_id is None:
            holder = store.lock.holder()
            if holder is None:
                return err("no cycle is running")
            cycle_id = holder.cycle_id
        try:
            state = cancel_cycle(create_app(cfg), store, cycle_id, force=args.force)
        except KeyError:
            return err(f"no cycle {cycle_id}")
        print(f"cycle {cycle_id}: {state}", flush=True)
        if args.wait and state not in TERMINAL:
            code = _wait(store, cycle_id, args.timeout)
            rec = store.get(cycle_id)
            return EXIT_OK if rec and rec.state == "cancelled" else code
        return EXIT_OK


def _cycle_status(args: argparse.Namespace) -> int:
    from instructloop.training.loop.store import redis_client

    try:
        cfg = loop_config(args)
    except ValueError as e:
        return err(str(e))
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
            return err(f"no cycle {args.cycle_id}" if args.cycle_id else "no cycle has run yet")
        if args.json:
            print(json.dumps(rec.to_dict(), indent=1))
        else:
            _print_record(rec, store)
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    import redis

    from instructloop.registry import RegistryError
    from instructloop.running import read_running, resolve_redis_url
    from instructloop.training.loop.status import gather, render
    from instructloop.training.loop.store import redis_client

    try:
        cfg = loop_config(args)
    except ValueError as e:
        return err(str(e))
    _, source = resolve_redis_url(args.redis_url)
    running = read_running()
    try:
        with redis_client(cfg.redis_url) as client:
            st = gather(client, cfg.key_prefix, running=running, last=args.last)
    except (redis.RedisError, RegistryError) as e:
        hint = " (is `instructloop up` running? else give --redis-url)"
        return err(f"Redis at {cfg.redis_url} ({source}): {e}{hint if source == 'default' else ''}")
    if args.json:
        print(json.dumps(st, indent=1, default=str))
    else:
        print(render(st))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = sub.add_parser("cycle", help="start, cancel and inspect training cycles")
    csub = c.add_subparsers(dest="cycle_cmd", required=True, metavar="VERB")
    run = csub.add_parser(
        "run",
        help="start a cycle now",
        description="Start a cycle (snapshot, reward model, PPO-ptx, evaluate, gate, promote) "
        "on the workers. Prints the cycle id. Refused (exit 1) while another cycle runs. "
        "With --wait: exit 0 promoted, 3 rejected by the gate, 1 failed or cancelled.",
    )
    add_redis_args(run)
    run.add_argument("--config", default=None, help="JSON CycleConfig (training/loop/config.py)")
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
    add_redis_args(cancel)
    cancel.add_argument("cycle_id", nargs="?", default=None)
    cancel.add_argument("--force", action="store_true")
    cancel.add_argument("--wait", action="store_true", help="wait until the cycle has ended")
    cancel.add_argument("--timeout", type=float, default=None)
    cancel.set_defaults(func=_cycle_cancel)

    status = csub.add_parser("status", help="show a cycle (default: the latest)")
    add_redis_args(status)
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
    add_redis_args(st)
    st.add_argument("--json", action="store_true", help="everything as JSON")
    st.add_argument("--last", type=int, default=5, metavar="N", help="past cycles to show (5)")
    st.set_defaults(func=_status)
