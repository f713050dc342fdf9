"""The Celery app of the training loop: Redis as broker and result backend, one `training` queue.

How a worker takes work, and why:
- `worker_concurrency=1`, `worker_prefetch_multiplier=1`: one task at a time per worker, and a
  worker reserves no second message while it trains. A training step fills the machine (all
  CPU cores, or the GPUs through torchrun/accelerate); scale out with more workers (machines),
  not more slots per worker.
- `task_acks_late=True`: a message is acknowledged after its task ends, so a worker that dies
  mid-step leaves it unacknowledged and it is delivered again; the steps are idempotent
  (runner.py), so the redelivered step finds finished work done and redoes only its own.
- `task_reject_on_worker_lost=True`: if the pool child running a task dies (OOM killer, a
  segfault in a native library), the message goes back to the queue instead of being acked.
- `visibility_timeout`: Redis has no real acks; kombu keeps unacked messages aside and hands
  them to another worker once they are older than this. A long step must finish well inside it,
  or a second worker would start the same step while the first still runs. It is therefore set
  above the step time limit, which the cycle enforces (`LoopConfig.__post_init__` checks it).
  The price: after a worker crash, the step resumes only once the timeout has passed.
- results expire (`result_expires`), json serialisation only (no pickle from the broker).
- Redis over TLS (`rediss://host:port/0?ssl_ca_certs=/path/ca.crt&ssl_cert_reqs=required`): the
  URL's ssl_* settings become `broker_use_ssl` and `redis_backend_use_ssl` (`redis_tls`), with
  the certificate checked unless the URL says `ssl_cert_reqs=none`. The same URL then means the
  same to the broker, the backend and redis-py (the store, the registry); kombu alone would not
  check the certificate of a rediss:// URL without settings.

Pool: prefork with one child by default. The heavy steps run in a subprocess of the task (so a
step can be cancelled, its memory is freed and a multi-GPU launcher can be used), so the pool
child itself stays light; prefork keeps the worker's main process (broker connection, metrics
server) alive when a task's process dies, and needs Prometheus' multiprocess mode for the
task metrics (metrics.py). On GPU machines the same holds: the pool child never
touches CUDA (only the step's subprocess does), so forking it is safe. `--pool solo` works too
(one process; no hard time limit).

Configuration comes from `LoopConfig.from_env()` (config.py), read when this module is imported,
so `celery -A instructloop.training.loop.celery_app worker` works as well as `instructloop worker`.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
from typing import Any

from celery import Celery, signals
from celery.beat import Scheduler
from redis.connection import parse_url

from instructloop.training.loop import metrics
from instructloop.training.loop.config import LoopConfig

TICK_TASK = "training.loop.tick"


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def redis_tls(url: str) -> tuple[str, dict[str, Any] | None]:
    """(the URL without its ssl_* settings, those settings typed as Celery's *_use_ssl dicts
    want them), or (url, None) for a URL without TLS.

    redis-py parses the settings, as it does for every other client of the same URL. They leave
    the URL because Celery's backend would pass the rest of its query on as strings
    (`ssl_check_hostname=false` would read as true). Raises ValueError for a bad setting."""
    if urllib.parse.urlsplit(url).scheme != "rediss":
        return url, None
    settings = {k: v for k, v in parse_url(url).items() if k.startswith("ssl_")}
    reqs = settings.get("ssl_cert_reqs", "required")
    if isinstance(reqs, str):
        if reqs.lower() not in _CERT_REQS:
            raise ValueError(
                f"ssl_cert_reqs={reqs!r} in the Redis URL: use none, optional or required"
            )
        reqs = _CERT_REQS[reqs.lower()]
    settings["ssl_cert_reqs"] = reqs
    parts = urllib.parse.urlsplit(url)
    rest = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if not k.startswith("ssl_")]
    plain = parts._replace(query=urllib.parse.urlencode(rest)).geturl()
    return plain, settings


def create_app(cfg: LoopConfig) -> Celery:
    url, tls = redis_tls(cfg.redis_url)
    app = Celery("instructloop", broker=url, backend=url)
    if tls is not None:
        app.conf.update(broker_use_ssl=dict(tls), redis_backend_use_ssl=dict(tls))
    app.conf.update(
        include=["instructloop.training.loop.tasks"],
        task_default_queue=cfg.queue,
        task_create_missing_queues=True,
        worker_concurrency=1,
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A hard backstop behind the cycle's own step limit (prefork only; the cycle stops
        # a step's subprocess itself at step_time_limit_s).
        task_time_limit=cfg.step_time_limit_s + 600,
        broker_transport_options={
            "visibility_timeout": cfg.visibility_timeout_s,
            "unacked_restore_interval": cfg.restore_interval_s,
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"visibility_timeout": cfg.visibility_timeout_s},
        result_expires=cfg.result_expires_s,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_track_started=True,
        worker_send_task_events=True,
        task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        # Beat renews its lock on every loop; it must loop well inside the lock's TTL.
        beat_max_loop_interval=max(1, cfg.beat_lock_ttl_s // 3),
        timezone="UTC",
    )
    app.loop_config = cfg  # type: ignore[attr-defined]
    return app


app = create_app(LoopConfig.from_env())


def loop_config() -> LoopConfig:
    return app.loop_config  # type: ignore[attr-defined,no-any-return]


# --- task metrics (prometheus_client; multiprocess mode under the prefork pool) ----------------


@signals.task_prerun.connect
def _on_task_prerun(task_id: str | None = None, **_kw: Any) -> None:
    if task_id:
        metrics.task_started(task_id)


@signals.task_postrun.connect
def _on_task_postrun(
    task_id: str | None = None, task: Any = None, state: str | None = None, **_kw: Any
) -> None:
    if task_id:
        metrics.task_ended(task_id, getattr(task, "name", "unknown"), state or "UNKNOWN")


@signals.task_revoked.connect
def _on_task_revoked(request: Any = None, **_kw: Any) -> None:
    name = getattr(request, "task_name", None) or getattr(request, "name", None) or "unknown"
    metrics.TASKS.labels(task=name, state="REVOKED").inc()


@signals.worker_process_shutdown.connect
def _on_child_exit(pid: int | None = None, **_kw: Any) -> None:
    metrics.mark_process_dead(pid or os.getpid())


@signals.worker_init.connect
def _on_worker_init(**_kw: Any) -> None:
    port = os.environ.get("INSTRUCTLOOP_WORKER_METRICS_PORT")
    if port and int(port) > 0:
        metrics.start_metrics_server(int(port))


# --- beat: the single active scheduler --------------------------------------------------------


class LockedScheduler(Scheduler):
    """Celery's in-memory scheduler that runs only while it holds the beat lock.

    `instructloop beat` acquires the lock before starting beat and sets `beat_lock`; every tick
    renews it first, so a beat that lost its lock (paused past the TTL, partitioned away) stops
    before it sends anything. The schedule needs no state on disk: the tick task decides from
    Redis whether a cycle is due.
    """

    beat_lock: Any = None  # locks.BeatLock, set by the CLI before beat starts

    def tick(self, *args: Any, **kwargs: Any) -> float:
        lock = type(self).beat_lock
        if lock is not None and not lock.renew():
            raise SystemExit(f"beat lock {lock.key} lost; stopping this beat")
        return float(super().tick(*args, **kwargs))
